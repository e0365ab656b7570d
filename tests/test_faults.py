"""Bad input and faults (issue 18): one-line errors with the right exit code, nothing lost,
nothing half-written, nothing silently wrong. Each case failed before its fix."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cxr_audit.cli.main import app
from cxr_audit.data.io import read_image
from cxr_audit.data.manifest import load_manifest
from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.gating import _nan_to_null

runner = CliRunner()


def _one_line_error(result, code):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert "error:" in result.output


def _png_claiming(path, width, height):
    """A valid PNG whose header claims ``width x height`` pixels (a decompression bomb's header)."""
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))


def test_image_reading_faults_are_named(tmp_path):
    _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(BadInputError, match="too large to decode"):
        read_image(tmp_path / "bomb.png")
    (tmp_path / "x.png").mkdir()
    with pytest.raises(BadInputError, match="is a directory"):
        read_image(tmp_path / "x.png")


def test_utf16_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.png,x\n", encoding="utf-16")
    with pytest.raises(BadInputError, match="not UTF-8"):
        load_manifest(tmp_path / "m.csv")


def test_empty_checkpoint_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    r = runner.invoke(app, ["scan", str(tmp_path), "--model", str(tmp_path / "empty.pt"), "--out",
                            str(tmp_path / "s.h5")])
    _one_line_error(r, 1)
    assert "cannot load checkpoint" in r.output


def test_train_refuses_blank_labels_and_bad_sizes_and_warns_on_rare_classes(tmp_path, phantoms):
    lines = phantoms.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    col = header.split(",").index("label")

    def with_label(row, value):
        parts = row.split(",")
        parts[col] = value
        return ",".join(parts)

    blank = [header, with_label(rows[0], "")] + rows[1:]
    (phantoms.parent / "blank.csv").write_text("\n".join(blank) + "\n")
    r = runner.invoke(app, ["train", str(phantoms.parent / "blank.csv"), "--out", str(tmp_path / "m.pt"),
                            "--epochs", "1", "--size", "32", "--device", "cpu"])
    _one_line_error(r, 2)
    assert "row 2" in r.output and "has no label" in r.output
    r = runner.invoke(app, ["train", str(phantoms), "--out", str(tmp_path / "m.pt"), "--size", "-5", "--device", "cpu"])
    _one_line_error(r, 2)
    assert "image size" in r.output
    typo = [header, with_label(rows[0], "diseaes")] + rows[1:]
    (phantoms.parent / "typo.csv").write_text("\n".join(typo) + "\n")
    from cxr_audit.training import rare_class_warnings

    warnings = rare_class_warnings(load_manifest(phantoms.parent / "typo.csv"))
    assert any("'diseaes' has only 1 image" in w for w in warnings)
    assert rare_class_warnings(load_manifest(phantoms)) == []


def test_failed_checkpoint_write_leaves_nothing(tmp_path, monkeypatch):
    from cxr_audit.data.dataset import Preprocessing
    from cxr_audit.models.registry import build_model, save_checkpoint

    def full_disk(obj, f, *args, **kwargs):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(BadInputError, match="cannot write checkpoint"):
        save_checkpoint(tmp_path / "m.pt", build_model("resnet18", 2, 1, 32), "resnet18", ["a", "b"],
                        Preprocessing(size=32))
    assert list(tmp_path.iterdir()) == []


def test_outputs_that_are_inputs_are_refused(tmp_path, poisoned):
    from cxr_audit.annotating import annotate
    from cxr_audit.data.inject import inject

    before = poisoned.read_bytes()
    with pytest.raises(UsageError, match="input's folder"):
        inject(poisoned, poisoned.parent, "marker", {"disease": 0.5})
    assert poisoned.read_bytes() == before
    (tmp_path / "scan.h5").write_bytes(b"precious")
    with pytest.raises(UsageError, match="is the scan itself"):
        annotate(tmp_path / "scan.h5", tmp_path / "scan.h5", seeds=[1, 2])
    assert (tmp_path / "scan.h5").read_bytes() == b"precious"
    with pytest.raises(UsageError, match=r"\[3\] are both --seeds and --negatives"):
        annotate(tmp_path / "scan.h5", tmp_path / "a.h5", seeds=[1, 3], negatives=[3, 4])


def test_negative_lambda_is_refused(tmp_path, shortcut_model, poisoned):
    r = runner.invoke(app, ["unlearn", "--model", str(shortcut_model), "--data", str(poisoned), "--out",
                            str(tmp_path / "u.pt"), "--method", "rrr", "--lambda", "-5", "--device", "cpu"])
    _one_line_error(r, 2)
    assert "must be >= 0" in r.output and not (tmp_path / "u.pt").exists()


def test_evaluate_and_gate_out_must_be_folders_and_unwritable_gate_is_exit_2(tmp_path, shortcut_model, poisoned):
    (tmp_path / "file").write_text("x")
    r = runner.invoke(app, ["evaluate", "--model", str(shortcut_model), "--data", str(poisoned), "--out",
                            str(tmp_path / "file"), "--device", "cpu"])
    _one_line_error(r, 2)
    (tmp_path / "g.toml").write_text(f'[gate]\nmodel = "{shortcut_model}"\ndata = "{poisoned}"\n'
                                     '[gate.thresholds]\nmin_accuracy = 0.5\n')
    r = runner.invoke(app, ["gate", "--config", str(tmp_path / "g.toml"), "--out", "/proc/no-such-dir/out"])
    _one_line_error(r, 2)


def test_error_messages_keep_bracketed_text(tmp_path):
    (tmp_path / "g.toml").write_text('[scan]\nx = 1\n')
    r = runner.invoke(app, ["gate", "--config", str(tmp_path / "g.toml"), "--out", str(tmp_path / "o")])
    _one_line_error(r, 2)
    assert "has no [gate] table" in r.output


def test_unwritable_train_output_is_one_line(tmp_path, phantoms):
    r = runner.invoke(app, ["train", str(phantoms), "--out", "/proc/no-such-dir/m.pt", "--epochs", "1",
                            "--size", "32", "--device", "cpu"])
    _one_line_error(r, 1)
    assert "/proc/no-such-dir" in r.output


def test_gate_json_is_strict_json():
    doc = _nan_to_null({"metrics": {"auroc": float("nan"), "list": [1.0, float("nan")]}, "ok": 0.5})
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text) == {"metrics": {"auroc": None, "list": [1.0, None]}, "ok": 0.5}


def test_scan_file_in_use_is_named(tmp_path):
    """Another process writing the scan (a second `scan` to the same file) holds HDF5's lock."""
    import subprocess
    import sys

    from cxr_audit.store.h5 import open_scan

    path = tmp_path / "s.h5"
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, time; f = h5py.File({str(path)!r}, 'w'); "
                               "print('open', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(BadInputError, match="in use by another process"):
            open_scan(path)
    finally:
        holder.kill()
        holder.wait()
