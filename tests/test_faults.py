"""Bad input and faults (issue 18): one-line errors with the right exit code, nothing lost,
nothing half-written, nothing silently wrong. Each case failed before its fix."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from cxr_audit.cli.main import app
from cxr_audit.data.io import read_image
from cxr_audit.data.manifest import load_manifest
from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.gate.pipeline import _nan_to_null
from PIL import Image
from typer.testing import CliRunner

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
    from cxr_audit.training.pipeline import manifest_warnings

    warnings = manifest_warnings(load_manifest(phantoms.parent / "typo.csv"))
    assert any("'diseaes' has only 1 image" in w for w in warnings)
    assert manifest_warnings(load_manifest(phantoms)) == []
    (phantoms.parent / "dup.csv").write_text("\n".join([header] + rows + rows[:3]) + "\n")
    assert any("3 image(s) appear in more than one" in w for w in manifest_warnings(load_manifest(phantoms.parent / "dup.csv")))


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
    from cxr_audit.annotate.pipeline import annotate
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


def test_annotations_of_other_images_are_refused(tmp_path):
    from cxr_audit.annotate.store import Annotations
    from cxr_audit.data.manifest import Sample

    def sample(i, name):
        (tmp_path / name).write_bytes(b"")
        return Sample(index=i, path=tmp_path / name, labels=(0,))

    ann = Annotations(tmp_path / "a.h5", "layer1", np.ones(4), {0: 1, 1: 0}, {0: 1.0, 1: 0.0}, tmp_path / "s.h5", {},
                      paths={0: str((tmp_path / "x0.png").resolve()), 1: str((tmp_path / "x1.png").resolve())})
    ann.check_samples([sample(0, "x0.png"), sample(1, "x1.png")])  # the same images: fine
    with pytest.raises(UsageError, match="made on other images: manifest row 1"):
        ann.check_samples([sample(0, "x0.png"), sample(1, "other.png")])
    with pytest.raises(UsageError, match="1 missing"):
        ann.check_samples([sample(0, "x0.png"), sample(1, "x1.png"), sample(2, "x2.png")])


def test_rows_the_scan_skipped_are_unknown_in_annotations(tmp_path, shortcut_model, poisoned):
    """`scan --skip-bad` rows used to be labelled "no artifact" (score 0) by annotate."""
    import csv

    import h5py
    from cxr_audit.annotate.store import read_annotations

    rows = list(csv.DictReader(open(poisoned)))
    train = [i for i, r in enumerate(rows) if r["split"] == "train"]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for r in rows:
        for key in ("path", "mask", "artifact_mask"):
            if r.get(key):
                r[key] = str((poisoned.parent / r[key]).resolve())
    rows[train[0]]["path"] = str(tmp_path / "broken.png")
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    r = runner.invoke(app, ["scan", str(tmp_path / "m.csv"), "--model", str(shortcut_model), "--out",
                            str(tmp_path / "s.h5"), "--split", "train", "--skip-bad", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["annotate", str(tmp_path / "s.h5"), "--from-column", "artifact", "--out",
                            str(tmp_path / "a.h5"), "--masks", str(tmp_path / "masks"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "a.h5") as f:
        stored = dict(zip(f["samples/index"][:].tolist(), f["labels"][:].tolist()))
    assert stored[train[0]] == -1 and set(stored.values()) == {-1, 0, 1}
    assert train[0] not in read_annotations(tmp_path / "a.h5").labels
    annotated = list(csv.DictReader(open(tmp_path / "masks" / "annotated.csv")))
    assert annotated[train[0]]["artifact"] == "" and annotated[train[1]]["artifact"] in ("0", "1")


def test_full_disk_during_scan_marks_no_unwritten_row_done(tmp_path, shortcut_model, poisoned, monkeypatch):
    """Simulated ENOSPC on the third batch's flush: exit 1 with "disk full", the two batches before
    are done and equal an uninterrupted scan, no later row is marked done; the rerun resumes."""
    import h5py

    clean = tmp_path / "clean.h5"
    assert runner.invoke(app, ["scan", str(poisoned), "--model", str(shortcut_model), "--out", str(clean),
                               "--split", "test", "--batch-size", "8", "--device", "cpu"]).exit_code == 0
    calls = {"n": 0}
    real_flush = h5py.File.flush

    def flaky_flush(self):
        calls["n"] += 1
        if calls["n"] == 5:  # two flushes per batch: the first flush of batch 3
            raise RuntimeError("Unable to flush file (file write failed: errno = 28, error message = "
                               "'No space left on device')")
        return real_flush(self)

    monkeypatch.setattr(h5py.File, "flush", flaky_flush)
    broken = tmp_path / "broken.h5"
    r = runner.invoke(app, ["scan", str(poisoned), "--model", str(shortcut_model), "--out", str(broken),
                            "--split", "test", "--batch-size", "8", "--device", "cpu"])
    _one_line_error(r, 1)
    assert "disk full" in r.output
    monkeypatch.setattr(h5py.File, "flush", real_flush)
    with h5py.File(broken) as f, h5py.File(clean) as g:
        done = f["done"][:]
        assert done[:16].all() and not done[16:].any()
        np.testing.assert_allclose(f["activations/layer2/max"][:16], g["activations/layer2/max"][:16], rtol=1e-5)
    r = runner.invoke(app, ["scan", str(poisoned), "--model", str(shortcut_model), "--out", str(broken),
                            "--split", "test", "--batch-size", "8", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    with h5py.File(broken) as f, h5py.File(clean) as g:
        assert f["done"][:].all()
        np.testing.assert_allclose(f["relevances/layer4"][:], g["relevances/layer4"][:], rtol=1e-4, atol=1e-6)


def test_scan_refuses_to_start_without_room(tmp_path, shortcut_model, poisoned, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    r = runner.invoke(app, ["scan", str(poisoned), "--model", str(shortcut_model), "--out", str(tmp_path / "s.h5"),
                            "--split", "test", "--device", "cpu"])
    _one_line_error(r, 1)
    assert "disk full: the scan needs about" in r.output


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "--batch-size and --heatmap-size must be >= 1"),
    (["--heatmap-size", "0"], "--batch-size and --heatmap-size must be >= 1"),
    (["--init", "nosuch"], "--init must be 'logit' or 'onehot'"),
])
def test_scan_option_errors_are_one_line(tmp_path, shortcut_model, poisoned, args, message):
    r = runner.invoke(app, ["scan", str(poisoned), "--model", str(shortcut_model), "--out", str(tmp_path / "s.h5"),
                            "--device", "cpu", *args])
    _one_line_error(r, 2)
    assert message in r.output and not (tmp_path / "s.h5").exists()


def test_reveal_refuses_empty_rankings(tmp_path):
    from cxr_audit.reveal.pipeline import reveal

    for kwargs in ({"top": 0}, {"max_k": 0}):
        with pytest.raises(UsageError, match="must be >= 1"):
            reveal(tmp_path / "missing.h5", tmp_path / "out", **kwargs)


def test_more_silent_passes_and_tracebacks_are_refused(tmp_path, shortcut_model, poisoned):
    """Found by this session's own sweep: each used to exit 0 (wrongly) or with a traceback."""
    before = shortcut_model.read_bytes()
    cases = [
        (["unlearn", "--model", str(shortcut_model), "--data", str(poisoned), "--out", str(shortcut_model),
          "--method", "balance", "--device", "cpu"], 2, "is the input model"),
        (["evaluate", "--model", str(shortcut_model), "--data", str(poisoned), "--out", str(tmp_path / "e"),
          "--sources", "a,b", "--device", "cpu"], 2, "not in the test data"),
        (["evaluate", "--model", str(shortcut_model), "--data", str(poisoned), "--out", str(tmp_path / "e"),
          "--batch-size", "0", "--device", "cpu"], 2, "--batch-size must be >= 1"),
        (["train", str(poisoned), "--out", str(tmp_path / "m.pt"), "--workers", "-1", "--device", "cpu"], 2,
         "--workers must be >= 0"),
        (["inject", str(poisoned), "--out", str(tmp_path / "inj"), "--artifact", "text", "--prevalence",
          "disease=0.5", "--split", "nosuch"], 2, "--split nosuch not in"),
    ]
    for args, code, message in cases:
        r = runner.invoke(app, args)
        _one_line_error(r, code)
        assert message in r.output, (args[0], r.output)
    assert shortcut_model.read_bytes() == before
    for body, message in (('batch_size = "abc"', "batch_size must be an integer"), ("seed = [1]", "seed must be"),
                          ('sources = "a"', "sources must be a list")):
        (tmp_path / "g.toml").write_text(f'[gate]\nmodel = "{shortcut_model}"\ndata = "{poisoned}"\n{body}\n'
                                         '[gate.thresholds]\nmin_accuracy = 0.5\n')
        r = runner.invoke(app, ["gate", "--config", str(tmp_path / "g.toml"), "--out", str(tmp_path / "g")])
        _one_line_error(r, 2)
        assert message in r.output


def test_unwritable_outputs_of_phantom_and_evaluate(shortcut_model, poisoned):
    r = runner.invoke(app, ["phantom", "--out", "/proc/no-such-dir/ph", "--n", "4", "--size", "32"])
    _one_line_error(r, 1)
    r = runner.invoke(app, ["evaluate", "--model", str(shortcut_model), "--data", str(poisoned), "--out",
                            "/proc/no-such-dir/ev", "--device", "cpu"])
    _one_line_error(r, 1)
    assert "/proc/no-such-dir" in r.output


def test_text_outputs_are_replaced_whole(tmp_path, monkeypatch):
    """A failure while writing leaves the previous file, not half of a new one (nor a .tmp)."""
    from pathlib import Path

    from cxr_audit.runtime import write_text_atomic

    target = tmp_path / "reveal.json"
    target.write_text('{"old": true}')

    def failing_write(self, text, encoding=None):
        open(self, "w").write(text[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", failing_write)
    with pytest.raises(OSError):
        write_text_atomic(target, '{"new": true, "long": "' + "x" * 1000 + '"}')
    monkeypatch.undo()
    assert target.read_text() == '{"old": true}' and sorted(p.name for p in tmp_path.iterdir()) == ["reveal.json"]
