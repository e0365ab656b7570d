"""`cxr-audit manifest`: a folder of DICOM/PNG files becomes a manifest with DICOM tags as columns."""

import csv

import numpy as np
import pytest
from cxr_audit.cli.main import app
from cxr_audit.data.folder_manifest import build_manifest
from cxr_audit.data.manifest import load_manifest
from cxr_audit.errors import BadInputError
from PIL import Image
from typer.testing import CliRunner

from test_io import _write_dicom

runner = CliRunner()


def _dicom(path, manufacturer, view, sex="F"):
    _write_dicom(path, (np.random.default_rng(0).random((32, 32)) * 4000))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Manufacturer, ds.ViewPosition, ds.PatientSex = manufacturer, view, sex
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "covid").mkdir(parents=True)
    (root / "normal").mkdir()
    _dicom(root / "covid" / "a.dcm", "SIEMENS", "AP")
    _dicom(root / "covid" / "b", "SIEMENS", "AP")  # DICOM without a suffix
    _dicom(root / "normal" / "c.dcm", "AGFA", "PA", sex="M")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "normal" / "d.png")
    (root / "normal" / "notes.txt").write_text("not an image")
    return root


def test_tags_become_columns_and_one_becomes_the_source(folder, tmp_path):
    out = build_manifest(folder, tmp_path / "m.csv", tags=["ViewPosition", "PatientSex"], source_tag="Manufacturer",
                         label_from_folder=True)
    rows = list(csv.DictReader(open(out)))
    by_name = {r["path"].split("/")[-1]: r for r in rows}
    assert set(by_name) == {"a.dcm", "b", "c.dcm", "d.png"}
    assert by_name["a.dcm"]["source"] == "SIEMENS" and by_name["c.dcm"]["source"] == "AGFA"
    assert by_name["c.dcm"]["ViewPosition"] == "PA" and by_name["c.dcm"]["PatientSex"] == "M"
    assert by_name["d.png"]["source"] == "" and by_name["d.png"]["label"] == "normal"
    manifest = load_manifest(out)  # paths resolve, labels and sources are read
    assert manifest.class_names == ["covid", "normal"]
    assert sorted(manifest.sources) == ["", "AGFA", "SIEMENS"]
    assert all(s.path.is_file() for s in manifest.samples)
    assert manifest.samples[0].extra["ViewPosition"] in ("AP", "PA", "")


def test_labels_from_a_csv_and_errors(folder, tmp_path):
    (tmp_path / "labels.csv").write_text("path,label\ncovid/a.dcm,covid\nc.dcm,normal\n")
    out = build_manifest(folder, tmp_path / "m.csv", labels_csv=tmp_path / "labels.csv")
    labels = {r["path"].split("/")[-1]: r["label"] for r in csv.DictReader(open(out))}
    assert labels == {"a.dcm": "covid", "b": "", "c.dcm": "normal", "d.png": ""}
    (tmp_path / "other.csv").write_text("path,label\nzzz.dcm,covid\n")
    with pytest.raises(BadInputError, match="no image under"):
        build_manifest(folder, tmp_path / "m2.csv", labels_csv=tmp_path / "other.csv")
    assert not (tmp_path / "m2.csv").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no images"):
        build_manifest(tmp_path / "empty", tmp_path / "m3.csv")


def test_cli_manifest(folder, tmp_path):
    r = runner.invoke(app, ["manifest", str(folder), "--out", str(tmp_path / "m.csv"), "--tag", "ViewPosition",
                            "--source-tag", "Manufacturer", "--label-from-folder"])
    assert r.exit_code == 0, r.output
    header = open(tmp_path / "m.csv").readline().strip().split(",")
    assert header[:3] == ["path", "label", "source"] and "ViewPosition" in header
    r = runner.invoke(app, ["manifest", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")])
    assert r.exit_code == 1 and "not a folder" in r.output
