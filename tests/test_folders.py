import numpy as np
import pandas as pd
import pytest
from PIL import Image

from klgrade.cli import main
from klgrade.ingest.manifest import read_manifest


def _png(path, value=100, size=32, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size), value, np.uint8)
    arr[size // 2] = 255 - value
    Image.fromarray(arr).convert(mode).save(path)


@pytest.fixture
def split_tree(tmp_path):
    root = tmp_path / "tree"
    for split, grade, name in [("train", 0, "9000001L"), ("train", 0, "9000001R"), ("train", 3, "9000002L"),
                               ("val", 1, "9000003R"), ("val", 4, "kneeA")]:
        _png(root / split / str(grade) / f"{name}.png", value=40 * grade + 10)
    (root / "train" / "2").mkdir(parents=True)
    (root / "train" / "2" / "9000004L.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt
    (root / "train" / "2" / "notes.txt").write_text("not an image")
    _png(root / "train" / "2" / "9000005R.png", mode="RGB")  # grayscale stored as RGB: accepted
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 1] = 200
    (root / "val" / "2").mkdir(parents=True)
    Image.fromarray(colour).save(root / "val" / "2" / "colour.png")
    return root


def test_prepare_folders_split_layout(split_tree, tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["prepare", "folders", str(split_tree), "--out", str(out)]) == 0
    df = read_manifest(out)
    assert len(df) == 6
    assert set(df["split"]) == {"train", "val"}  # the source's split is kept
    row = df.set_index("image_id").loc["9000001L"]
    assert (row["patient_id"], row["side"], row["klg"], row["split"]) == ("9000001", "L", 0, "train")
    assert df.set_index("image_id").loc["kneeA", "patient_id"] == "kneeA"
    rejects = pd.read_csv(out / "rejects.csv")
    reasons = dict(zip(rejects["path"].map(lambda p: p.rsplit("/", 1)[-1]), rejects["reason"]))
    assert set(reasons) == {"9000004L.png", "notes.txt", "colour.png"}
    assert "not a readable image" in reasons["9000004L.png"]
    assert "not an image file" in reasons["notes.txt"]
    assert "colour" in reasons["colour.png"]
    printed = capsys.readouterr().out
    assert "its own patient" in printed and "rejected 3" in printed
    # referenced, not copied
    assert not (out / "images").exists()
    assert df["path"].str.startswith(str(split_tree)).all()


def test_prepare_folders_grade_layout_makes_patient_split(tmp_path):
    root = tmp_path / "g"
    for p in range(40):
        for side in "LR":
            _png(root / str(p % 5) / f"{9100000 + p}{side}.png", value=p)
    out = tmp_path / "ds"
    assert main(["prepare", "folders", str(root), "--out", str(out), "--split", "0.6,0.2,0.2",
                 "--seed", "3", "--copy"]) == 0
    df = read_manifest(out)
    assert set(df["split"]) == {"train", "val", "test"}
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert (out / df["path"].iloc[0]).is_file() and not df["path"].iloc[0].startswith("/")
    first = pd.read_csv(out / "manifest.csv")
    assert main(["prepare", "folders", str(root), "--out", str(tmp_path / "ds2"), "--split", "0.6,0.2,0.2",
                 "--seed", "3"]) == 0
    assert pd.read_csv(tmp_path / "ds2" / "manifest.csv")["split"].tolist() == first["split"].tolist()


def test_prepare_csv(tmp_path):
    imgs = tmp_path / "imgs"
    for i in range(6):
        _png(imgs / f"k{i}.png", value=i * 30)
    (tmp_path / "t.csv").write_text("path,klg,patient_id\n" + "".join(
        f"imgs/k{i}.png,{i % 5},P{i // 2}\n" for i in range(6)) + "imgs/missing.png,1,P9\nimgs/k0.png,x,P9\n")
    out = tmp_path / "ds"
    assert main(["prepare", "csv", str(tmp_path / "t.csv"), "--out", str(out), "--split", "0.5,0.5,0"]) == 0
    df = read_manifest(out)
    assert len(df) == 6 and (df.groupby("patient_id")["split"].nunique() == 1).all()
    rej = pd.read_csv(out / "rejects.csv")
    assert rej["reason"].str.contains("line 8: file not found").any()
    assert rej["reason"].str.contains("line 9: klg 'x'").any()


def test_missing_root_is_clear_error(tmp_path, capsys):
    assert main(["prepare", "folders", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.realdata
def test_real_kneekl224_ingest(real_data, tmp_path):
    out = tmp_path / "kl224"
    assert main(["prepare", "folders", str(real_data), "--out", str(out)]) == 0
    df = read_manifest(out)
    assert len(df) == 6604
    assert df["patient_id"].nunique() == 3302
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert df[df["split"] == "train"]["klg"].value_counts().sort_index().tolist() == [2286, 1046, 1516, 757, 173]
    # no image is rejected; the dataset's own notes (SOURCE.md) are listed, as every stray file is
    rejected = (out / "rejects.csv").read_text().strip().split("\n")[1:]
    assert all(",not an image file outside" in r for r in rejected)
