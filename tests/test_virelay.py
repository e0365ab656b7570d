"""`reveal` writes a ViRelAy project that the real ViRelAy 1.0 opens as written."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from cxr_audit.reveal.pipeline import reveal
from cxr_audit.scan.pipeline import scan

VIRELAY_VENV = Path(__file__).resolve().parents[1] / ".venv-virelay"


@pytest.fixture(scope="module")
def revealed(shortcut_model, poisoned, tmp_path_factory):
    out = tmp_path_factory.mktemp("virelay")
    s = scan(shortcut_model, poisoned, out / "s.h5", split="train", device="cpu").path
    return reveal(s, out / "rev", references=False), out / "rev" / "virelay"


def test_project_files_fit_together(revealed):
    result, folder = revealed
    project = yaml.safe_load((folder / "project.yaml").read_text())["project"]
    labels = json.loads((folder / project["label_map"]).read_text())
    assert [l["word_net_id"] for l in labels] == result["class_names"] == [l["name"] for l in labels]
    n = len(result["sample_ids"])
    with h5py.File(folder / project["dataset"]["path"]) as d, h5py.File(folder / "attributions.h5") as a:
        assert d["data"].shape == (n, 64, 64, 3) and d["data"].dtype == np.uint8 and d["data"][:].std() > 0
        assert a["attribution"].shape == (n, 1, 64, 64) and (a["index"][:] == np.arange(n)).all()
        assert a["prediction"].shape == (n, len(labels)) and d["label"].dtype == np.uint16
    spaces = {c["space"] for c in result["clusters"]}
    assert len(project["analyses"]) == len(spaces) >= 2  # every clustering space, not only the heatmap one
    by_id = {c["id"]: c for c in result["clusters"]}
    for analysis in project["analyses"]:
        with h5py.File(folder / analysis["sources"][0]) as f:
            assert set(f) <= set(result["class_names"])
            for category in f:
                index = f[category]["index"][:]
                assert index.max() < n
                ids = f[category]["cluster/reveal-id"][:]
                for cluster_id in set(ids.tolist()) - {-1}:  # cluster ids are reveal.json's
                    members = {result["sample_ids"][i] for i in index[ids == cluster_id]}
                    assert members == set(by_id[cluster_id]["members"])
                    assert by_id[cluster_id]["space"] in analysis["analysis_method"]


def _virelay_python() -> Path | None:
    """A venv with ViRelAy 1.0.0 (needs Python >= 3.11.13: this machine's pyenv 3.12), made once."""
    python = VIRELAY_VENV / "bin" / "python"
    if python.exists():
        return python
    candidates = [shutil.which("python3.12"), shutil.which("python3.13")]
    candidates += [str(p) for p in Path("/root/.pyenv/versions").glob("3.1[23]*/bin/python")]
    for base in filter(None, candidates):
        version = subprocess.run([base, "-c", "import sys; print(sys.version_info >= (3, 11, 13))"],
                                 capture_output=True, text=True)
        if version.stdout.strip() == "True":
            subprocess.run([base, "-m", "venv", str(VIRELAY_VENV)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "virelay==1.0.0"], check=True)
            return python
    return None


OPEN_PROJECT = """
import sys
from virelay.model import Workspace
ws = Workspace()
ws.add_project(sys.argv[1])
project = ws.get_project(ws.get_project_names()[0])
count = 0
for method in project.get_analysis_methods():
    for category in project.get_analysis_categories(method):
        for clustering in project.get_analysis_clustering_names(method):
            for embedding in project.get_analysis_embedding_names(method):
                analysis = project.get_analysis(method, category.name, clustering, embedding)
                for i in analysis.attribution_indices[:3]:
                    sample = project.get_sample(int(i))
                    attribution = project.get_attribution(int(i))
                    assert sample.data.shape[:2] == attribution.data.shape[:2], (sample.data.shape, attribution.data.shape)
                    assert attribution.render_heatmap("blue-white-red", sample.data).shape[:2] == sample.data.shape[:2]
                    count += 1
print("OK", len(project.get_analysis_methods()), count)
"""


@pytest.fixture(scope="module")
def virelay_python() -> Path:
    """The ViRelAy venv's interpreter; the test is skipped, saying why, where none can be made."""
    python = _virelay_python()
    if python is None:
        pytest.skip("no Python >= 3.11.13 on this machine for ViRelAy 1.0")
    return python


@pytest.mark.slow
def test_real_virelay_opens_the_project(revealed, virelay_python):
    python = virelay_python
    _, folder = revealed
    r = subprocess.run([str(python), "-c", OPEN_PROJECT, str(folder / "project.yaml")], capture_output=True,
                       text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
    methods, opened = map(int, r.stdout.split()[1:3])
    assert methods >= 2 and opened > 0


@pytest.mark.slow
def test_virelay_server_serves_the_project(revealed, virelay_python):
    """`virelay project.yaml` starts and serves projects, images and heatmaps (loopback only)."""
    import socket
    import time
    import urllib.request

    python = virelay_python
    _, folder = revealed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(python.parent / "virelay"), "-H", "127.0.0.1", "-p", str(port),
                               str(folder / "project.yaml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api/projects"
    try:
        for _ in range(60):  # at most ~30 s for the server to come up
            try:
                projects = json.loads(urllib.request.urlopen(base, timeout=2).read())
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("virelay did not start")
        assert len(projects) == 1
        project_id = projects[0]["id"]
        for path in ("/dataset/0/image", "/attributions/0/heatmap"):
            with urllib.request.urlopen(f"{base}/{project_id}{path}", timeout=10) as response:
                assert response.status == 200 and len(response.read()) > 100
    finally:
        server.kill()
        server.wait()
