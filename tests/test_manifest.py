import numpy as np
import pytest
import torch
from cxr_audit.data.dataset import CxrDataset, Preprocessing, collate
from cxr_audit.data.manifest import load_manifest, write_manifest
from cxr_audit.errors import BadInputError
from PIL import Image


def _img(path, h=20, w=30, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), value, np.uint8)).save(path)


def test_manifest_labels_sources_and_extra_columns(tmp_path):
    for i in range(3):
        _img(tmp_path / f"i{i}.png")
    write_manifest(tmp_path / "m.csv", [
        {"path": "i0.png", "label": "covid", "source": "A", "split": "train", "patient": "p1"},
        {"path": "i1.png", "label": "normal", "source": "B", "split": "test", "patient": "p2"},
        {"path": "i2.png", "label": "covid|normal", "source": "B", "split": "test", "patient": "p3"},
    ])
    m = load_manifest(tmp_path / "m.csv")
    assert m.class_names == ["covid", "normal"] and m.multilabel
    assert m[1].labels == (1,) and m[2].labels == (0, 1) and m[0].extra == {"patient": "p1"}
    assert [s.index for s in m.subset("test").samples] == [1, 2]


def test_a_manifest_written_elsewhere_reads_back_the_same_samples(tmp_path, monkeypatch):
    """Manifest.write keeps every column and rebases paths on the new folder (also from a
    manifest loaded by a relative path)."""
    from dataclasses import replace

    for name in ("a.png", "m.png", "art.png"):
        _img(tmp_path / "data" / name)
    write_manifest(tmp_path / "data" / "m.csv", [
        {"path": "a.png", "label": "covid|normal", "source": "A", "split": "train", "mask": "m.png",
         "artifact": 1, "artifact_mask": "art.png", "patient": "p1"},
        {"path": "a.png", "label": "normal", "source": "B", "split": "test", "artifact": 0, "patient": "p2"}])
    monkeypatch.chdir(tmp_path)
    m = load_manifest("data/m.csv")
    written = replace(m, samples=m.samples[::-1]).write(tmp_path / "elsewhere" / "deep" / "out.csv")
    back = load_manifest(written, class_names=m.class_names)
    assert "data/a.png" in written.read_text()  # relative, not absolute
    for old, new in zip(m.samples[::-1], back.samples):
        assert new.path.resolve() == old.path.resolve() and new.labels == old.labels
        assert (new.source, new.split, new.artifact, new.extra) == (old.source, old.split, old.artifact, old.extra)
        assert (new.mask and new.mask.resolve()) == (old.mask and old.mask.resolve())
        assert (new.artifact_mask and new.artifact_mask.resolve()) == (old.artifact_mask and old.artifact_mask.resolve())
    assert back.multilabel and back[1].mask is not None and back[0].mask is None


def test_unknown_label_names_the_row(tmp_path):
    _img(tmp_path / "a.png")
    write_manifest(tmp_path / "m.csv", [{"path": "a.png", "label": "zebra"}])
    with pytest.raises(BadInputError, match=r"row 2: unknown label 'zebra'"):
        load_manifest(tmp_path / "m.csv", class_names=["covid", "normal"])


def test_missing_manifest_and_missing_path_column(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_manifest(tmp_path / "none.csv")
    (tmp_path / "x.csv").write_text("file,label\na.png,0\n")
    with pytest.raises(BadInputError, match="no 'path' column"):
        load_manifest(tmp_path / "x.csv")


def test_image_folder(tmp_path):
    _img(tmp_path / "covid" / "a.png")
    _img(tmp_path / "normal" / "b.png")
    _img(tmp_path / "normal" / "c.png")
    m = load_manifest(tmp_path)
    assert m.class_names == ["covid", "normal"] and [s.label for s in m.samples] == [0, 1, 1]


def test_dataset_resizes_normalises_and_pairs_masks(tmp_path):
    _img(tmp_path / "a.png", value=255)
    mask = np.zeros((20, 30), np.uint8)
    mask[:10] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    write_manifest(tmp_path / "m.csv", [{"path": "a.png", "label": "x", "mask": "m.png"},
                                        {"path": "a.png", "label": "y", "mask": "m.png"}])
    prep = Preprocessing(size=16, channels=3, mean=0.5, std=0.25)
    item = CxrDataset(load_manifest(tmp_path / "m.csv"), prep)[0]
    assert item["image"].shape == (3, 16, 16)
    assert torch.allclose(item["image"], torch.full((3, 16, 16), 2.0))
    assert item["mask"].shape == (1, 16, 16) and item["mask"][0, :8].all() and not item["mask"][0, 8:].any()


def test_mask_size_mismatch_is_an_error(tmp_path):
    _img(tmp_path / "a.png", 20, 30)
    _img(tmp_path / "m.png", 10, 10)
    write_manifest(tmp_path / "m.csv", [{"path": "a.png", "label": "x", "mask": "m.png"}])
    with pytest.raises(BadInputError, match="mask .*m.png is 10x10 but image .*a.png is 30x20"):
        CxrDataset(load_manifest(tmp_path / "m.csv"), Preprocessing(size=16))[0]


def test_skip_bad_moves_errors_out_of_the_batch(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"broken")
    write_manifest(tmp_path / "m.csv", [{"path": "a.png", "label": "x"}, {"path": "b.png", "label": "y"}])
    ds = CxrDataset(load_manifest(tmp_path / "m.csv"), Preprocessing(size=8), skip_bad=True)
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape[0] == 1 and batch["errors"][0][0] == 1 and "b.png" in batch["errors"][0][1]
    strict = CxrDataset(load_manifest(tmp_path / "m.csv"), Preprocessing(size=8))
    with pytest.raises(BadInputError, match="b.png"):
        strict[1]
