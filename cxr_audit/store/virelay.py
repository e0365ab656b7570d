"""A ViRelAy project folder that ``virelay project.yaml`` opens as is (ViRelAy 1.0; Anders et al.,
2021, "Software for dataset-wide XAI: from local explanations to global insights with Zennit,
CoRelAy, and ViRelAy", arXiv:2106.13200).

Files (all positions are rows of the scan's finished samples, 0..N-1, so the analysis index
finds the image and the attribution):

* ``project.yaml`` — name, model, label map, dataset, attributions, one analysis per clustering
  space that ``reveal`` computed (``heatmap``, ``relevance:<layer>``, ``activation:<layer>``);
* ``label-map.json`` — ``[{index, word_net_id, name}]`` with ``word_net_id`` = the class name,
  so the analysis categories (class names) resolve to labels;
* ``dataset.h5`` — ``data (N, S, S, 3)`` uint8 images at the heatmap size, ``label`` (N,) uint16
  (multi-label: (N, K) bool);
* ``attributions.h5`` — ``index (N,)``, ``attribution (N, 1, S, S)`` float32, ``label``,
  ``prediction (N, K)`` float32;
* ``analysis-<space>.h5`` — ``/<category>/index``, ``embedding/spectral`` (with ``eigenvalue``),
  ``embedding/tsne|umap`` for the heatmap space, ``cluster/reveal-id``: each member's cluster id as
  in ``reveal.json`` and the report (``-1``: the class was not split).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import yaml


@dataclass
class CategoryAnalysis:
    """One class's clustering in one feature space: ``index`` (n,) positions, embeddings by name,
    spectral eigenvalues, cluster id per member (``reveal.json`` ids)."""

    index: np.ndarray
    embeddings: dict[str, np.ndarray]
    eigenvalues: np.ndarray
    cluster_ids: np.ndarray
    cluster_name: str = "reveal-id"


@dataclass
class ProjectData:
    name: str
    model: str
    class_names: list[str]
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int or (N, K) multi-hot
    heatmaps: np.ndarray  # (N, S, S)
    predictions: np.ndarray  # (N, K)
    attribution_method: str
    strategy: str  # "predicted_label" | "true_label"
    analyses: dict[str, dict[str, CategoryAnalysis]] = field(default_factory=dict)  # space -> category -> analysis


def space_file(space: str) -> str:
    """``relevance:layer3`` -> ``analysis-relevance-layer3.h5``."""
    return "analysis-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", space) + ".h5"


def write_project(folder: str | Path, data: ProjectData) -> Path:
    """Write the project folder; returns ``project.yaml``'s path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = [{"index": i, "word_net_id": n, "name": n} for i, n in enumerate(data.class_names)]
    (folder / "label-map.json").write_text(json.dumps(labels, indent=1))
    multilabel = data.labels.ndim == 2
    label = data.labels.astype(bool) if multilabel else data.labels.astype(np.uint16)
    with h5py.File(folder / "dataset.h5", "w") as f:
        f.create_dataset("data", data=data.images, chunks=(1,) + data.images.shape[1:])
        f["label"] = label
    with h5py.File(folder / "attributions.h5", "w") as f:
        f["index"] = np.arange(len(data.heatmaps), dtype=np.uint32)
        f.create_dataset("attribution", data=data.heatmaps[:, None].astype(np.float32),
                         chunks=(1, 1) + data.heatmaps.shape[1:])
        f["label"] = label
        f["prediction"] = data.predictions.astype(np.float32)
    for space, categories in data.analyses.items():
        write_analysis(folder / space_file(space), categories)
    size = data.images.shape[1]
    project = {"project": {
        "name": data.name, "model": data.model, "label_map": "label-map.json",
        "dataset": {"name": data.name, "type": "hdf5", "path": "dataset.h5", "input_width": size,
                    "input_height": size, "up_sampling_method": "none", "down_sampling_method": "none",
                    "label_index_regex": None, "label_word_net_id_regex": None},
        "attributions": {"attribution_method": data.attribution_method, "attribution_strategy": data.strategy,
                         "sources": ["attributions.h5"]},
        "analyses": [{"analysis_method": f"SpRAy ({space})", "sources": [space_file(space)]}
                     for space in data.analyses]}}
    path = folder / "project.yaml"
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


def write_analysis(path: Path, categories: dict[str, CategoryAnalysis]) -> None:
    """One ViRelAy analysis database: per category ``index``, ``embedding/<name>`` (``spectral``
    with its ``eigenvalue`` attribute) and ``cluster/<cluster_name>``."""
    with h5py.File(path, "w") as f:
        for name, analysis in categories.items():
            g = f.create_group(name)
            g["index"] = analysis.index.astype(np.uint32)
            for embedding, values in analysis.embeddings.items():
                ds = g.create_dataset(f"embedding/{embedding}", data=values.astype(np.float32))
                if embedding == "spectral":
                    ds.attrs["eigenvalue"] = analysis.eigenvalues.astype(np.float32)
            g[f"cluster/{analysis.cluster_name}"] = analysis.cluster_ids.astype(np.int32)
