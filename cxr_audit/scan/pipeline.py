"""``scan``: model + data -> one HDF5 file with predictions, heatmaps, activations and concept
relevances for every sample (schema: :mod:`cxr_audit.store.schema`).

One forward and one modified backward pass per batch yield all of it; the LRP composite stays
registered across batches and parameters are frozen, so no weight gradients are computed.
A scan that is killed resumes where it stopped and gives the same file as an uninterrupted one.

Under ``torchrun`` (or any initialised process group) every process explains its share of the
pending rows (``pending[rank::world]``, its own DataLoader) and sends each batch's arrays to rank
0, the only process that opens the file and writes them: one store, the same rows as a
single-process scan, still resumable.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from cxr_audit.data.dataset import CxrDataset, collate
from cxr_audit.data.manifest import load_manifest
from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.explain import create_method, default_layers, explain_batch
from cxr_audit.explain.capture import get_module
from cxr_audit.explain.prp import prototype_explanations
from cxr_audit.models.architectures import spec_of
from cxr_audit.models.registry import file_sha256, load_frozen, preprocessing_of
from cxr_audit.runtime import autocast, init_distributed, now, rank_and_world, resolve_device, versions
from cxr_audit.store.scan_writer import ScanBatch, ScanWriter
from cxr_audit.store.schema import TARGETS, finding_index


def _explained(target: str, batch: dict, class_names: list[str]) -> torch.Tensor | None:
    """``(N,)`` output index per sample that ``target`` explains (``None``: the predicted one)."""
    if target == "pred":
        return None
    if target == "true":
        return batch["label"]
    return torch.full((len(batch["index"]),), finding_index(target, class_names), dtype=torch.long)


@dataclass
class ScanSummary:
    path: Path
    n: int
    done: int
    skipped: list[tuple[int, str]]
    seconds: float
    resumed_from: int


def scan(model: str | Path, data: str | Path, out: str | Path, *, layers: list[str] | None = None,
         method: str = "lrp", targets: tuple[str, ...] = ("pred",), heatmap_size: int = 64,
         batch_size: int = 16, split: str | None = None, init: str = "logit", device: str = "auto",
         amp: bool = False, num_workers: int = 0, skip_bad: bool = False, overwrite: bool = False,
         cam_layer: str | None = None, method_options: dict | None = None, prototype_maps: int = 3,
         on_progress: Callable[..., None] | None = None) -> ScanSummary:
    """Scan ``data`` (manifest CSV or ImageFolder) with checkpoint ``model`` into ``out`` (.h5).

    ``targets``: which class each heatmap explains, ``pred`` (predicted) and/or ``true`` (label), or
    ``finding:NAME`` (that output's logit for every image: multi-label models). Concept relevances
    are those of the first target.
    ``layers``: layers whose channel activations (spatial max/mean) and CRP relevances are stored
    (default: early/middle/late layers of the architecture). ``heatmap_size``: stored heatmaps are
    sum-pooled to this size. ``method_options``: the attribution method's own (``{"epsilon": "1e-4"}``
    for ``lrp-zennit``), recorded in the scan. ``prototype_maps``: for a ProtoPNet, the PRP and
    upsampled-similarity maps of this many of the predicted class's top prototypes per image
    (:mod:`cxr_audit.explain.prp`). An existing ``out`` with the same options is resumed, else error unless ``overwrite``.
    """
    out = Path(out)
    _check_options(targets, batch_size, heatmap_size, num_workers, init)
    dev = init_distributed(resolve_device(device))
    net, config, prep, manifest = _load_inputs(model, data, targets, split, dev)
    layers = _layers_to_record(layers, config["arch"], net)
    heatmap_size = min(heatmap_size, prep.size)
    prototype_layer = spec_of(config["arch"]).prototype_layer
    options = {"layers": layers, "method": method, "targets": list(targets), "heatmap_size": heatmap_size,
               "split": split, "init": init, "cam_layer": cam_layer, "amp": bool(amp),
               "prototype_maps": prototype_maps if prototype_layer else 0}
    method_options = _method_options(method, cam_layer, method_options, options)
    meta = _scan_meta(model, data, config, prep, options)

    autocast(dev, amp, on_cpu=True)  # refuses --amp on a CPU without bf16 kernels before any file is written
    net, attribution, capture = _attribution(net, config["arch"], prep, method, method_options,
                                             layers + ([prototype_layer] if options["prototype_maps"] else []))
    rank, world = rank_and_world()
    opened = _agreed(lambda: _open_or_create(out, meta, options, overwrite, manifest, net, capture, layers, prep,
                                             targets, heatmap_size, config, dev) if rank == 0 else None)
    start = time.perf_counter()
    try:
        pending = _agreed(lambda: _pending(opened) if rank == 0 else None, broadcast=True)
        resumed_from = len(manifest) - len(pending)
        # dataset positions equal scan rows: the manifest subset is stored in order
        row_of = {s.index: r for r, s in enumerate(manifest.samples)}
        loader = DataLoader(Subset(CxrDataset(manifest, prep, skip_bad=skip_bad, with_masks=False),
                                   pending[rank::world].tolist()),
                            batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
        explainer = _BatchExplainer(attribution, capture, dev, amp, init, tuple(targets), config["class_names"],
                                    layers, heatmap_size, prototype_layer, options["prototype_maps"])
        with attribution.rules(), capture.attached(attribution.model):
            if world == 1:
                skipped = _scan_pending(opened, loader, row_of, explainer, resumed_from, len(manifest), on_progress)
            else:
                steps = math.ceil(math.ceil(len(pending) / world) / batch_size)  # batches of the largest share
                skipped = _scan_shared(opened, loader, row_of, explainer, steps, resumed_from, len(manifest),
                                       on_progress)
        total_done = _agreed(lambda: opened.done_count() if rank == 0 else None, broadcast=True)
    finally:
        if opened is not None:
            opened.close()
    return ScanSummary(out, len(manifest), total_done, skipped, time.perf_counter() - start, resumed_from)


def _load_inputs(model, data, targets: tuple[str, ...], split: str | None, dev):
    """``(frozen net, its config, preprocessing, manifest subset)``; one-line errors for targets the
    model or data cannot have."""
    net, config = load_frozen(model, dev)
    for target in targets:
        finding_index(target, config["class_names"])
    manifest = load_manifest(data, class_names=config["class_names"],
                             multilabel=config.get("multilabel", False)).subset(split)
    if "true" in targets and manifest.multilabel:
        raise UsageError("target 'true' needs single-label data; use --target pred")
    return net, config, preprocessing_of(config), manifest


def _method_options(method: str, cam_layer: str | None, given: dict | None, options: dict) -> dict:
    """The attribution method's options (``--cam-layer`` is gradcam's ``cam_layer``), recorded in
    the scan's ``options`` when there are any (so scans made without options keep resuming)."""
    merged = {**({"cam_layer": cam_layer} if method == "gradcam" and cam_layer else {}), **(given or {})}
    if merged:
        options["method_options"] = {k: str(v) for k, v in merged.items()}
    return merged


def _attribution(net, arch: str, prep, method: str, method_options: dict, layers: list[str]):
    """``(net, attribution method, layer capture)``; the net in channels-last memory format (NHWC
    convolutions are faster on CUDA and on oneDNN CPUs alike: vgg16 LRP step -22 % on CPU)."""
    net = net.to(memory_format=torch.channels_last)
    attribution = create_method(method, net, arch, prep, **method_options)
    return net, attribution, attribution.capture(layers)


def _pending(writer: ScanWriter) -> np.ndarray:
    """Rows not yet done; refuses to start when they cannot fit on the disk."""
    pending = writer.pending()
    writer.check_free_space(len(pending))
    return pending


def _agreed(step: Callable[[], object], broadcast: bool = False):
    """Run ``step`` (rank 0's work) so that a one-line error on rank 0 stops every rank alike
    instead of leaving the others waiting; with ``broadcast`` every rank gets rank 0's result."""
    rank, world = rank_and_world()
    if world == 1:
        return step()
    import torch.distributed as dist

    try:
        result, error = step(), None
    except (BadInputError, UsageError) as exc:
        result, error = None, exc
    message = [None if error is None else (type(error).__name__, str(error)),
               result if broadcast and rank == 0 else None]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        if error is not None:
            raise error
        raise (UsageError if message[0][0] == "UsageError" else BadInputError)(message[0][1])
    return message[1] if broadcast else result


def _layers_to_record(layers: list[str] | None, arch: str, net) -> list[str]:
    """The given layers (each must exist) or the architecture's default early/middle/late ones."""
    layers = list(layers) if layers else default_layers(arch, net)
    for layer in layers:
        get_module(net, layer)
    return layers


def _scan_meta(model, data, config: dict, prep, options: dict) -> dict:
    """What ``/meta`` records: the model (path, sha256), the data, classes, preprocessing, options."""
    return {"arch": config["arch"], "checkpoint": str(Path(model).resolve()),
            "checkpoint_sha256": file_sha256(model), "data": str(Path(data).resolve()),
            "class_names": config["class_names"], "preprocessing": prep.to_dict(), "options": options,
            "created": now(), "versions": versions(), **options}


def _check_options(targets, batch_size: int, heatmap_size: int, num_workers: int, init: str) -> None:
    """One-line errors for option values, before any model or file is touched."""
    if not targets:
        raise UsageError(f"targets must be among {TARGETS}, got none")
    if batch_size < 1 or heatmap_size < 1 or num_workers < 0:
        raise UsageError("--batch-size and --heatmap-size must be >= 1 and --workers >= 0")
    if init not in ("logit", "onehot"):
        raise UsageError(f"--init must be 'logit' or 'onehot', got '{init}'")


@dataclass
class _BatchExplainer:
    """Explains one batch for every target and writes its rows: the scan's per-batch options."""

    attribution: object
    capture: object
    device: torch.device
    amp: bool
    init: str
    targets: tuple[str, ...]
    class_names: list[str]
    layers: list[str]
    heatmap_size: int
    prototype_layer: str | None = None
    prototype_maps: int = 0

    def __call__(self, batch: dict) -> ScanBatch:
        """The batch's results, as the scan file stores them."""
        x = batch["image"].to(self.device).contiguous(memory_format=torch.channels_last)
        wanted = {t: _explained(t, batch, self.class_names) for t in self.targets}
        with autocast(self.device, self.amp, on_cpu=True):
            expl = explain_batch(self.attribution, self.capture, x, wanted, init=self.init)
        out = ScanBatch(expl.logits.cpu().numpy())
        for t, heat in expl.heatmaps.items():
            if not torch.isfinite(heat).all():
                raise BadInputError(f"non-finite relevance for samples {batch['index'].tolist()} "
                                    f"(target {t}); the model produces NaN/Inf outputs")
            out.heatmaps[t] = _pool(heat, self.heatmap_size).cpu().numpy().astype(np.float16)
            out.targets[t] = expl.targets[t].cpu().numpy()
        for layer in self.layers:
            out.act_max[layer] = expl.act_max[layer].cpu().numpy()
            out.act_mean[layer] = expl.act_mean[layer].cpu().numpy()
            out.relevances[layer] = expl.relevances[layer].cpu().numpy()
        if self.prototype_maps:
            with autocast(self.device, self.amp, on_cpu=True):
                out.prototypes = self._prototypes(x)
        return out

    def _prototypes(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """The top prototypes' numbers, scores, PRP and upsampled-similarity maps."""
        pe = prototype_explanations(self.attribution, self.capture, x, self.prototype_layer, self.prototype_maps)
        n, k, h, w = pe.prp.shape
        prp = _pool(pe.prp.reshape(n * k, h, w), self.heatmap_size).reshape(n, k, self.heatmap_size, -1)
        act = F.adaptive_avg_pool2d(pe.activation, self.heatmap_size)
        return {"index": pe.index.cpu().numpy(), "score": pe.score.cpu().numpy(),
                "prp": prp.cpu().numpy().astype(np.float16), "activation": act.cpu().numpy().astype(np.float16)}


@dataclass
class _BatchRows:
    """One batch's results, computed on any rank and written by rank 0: the rows (ascending) and
    their arrays, the unreadable samples ``(index, row, message)``, or the error that stops the scan."""

    rows: np.ndarray
    results: ScanBatch | None
    errors: list[tuple[int, int, str]]
    failure: str | None = None

    def write(self, writer: ScanWriter) -> list[tuple[int, str]]:
        """Write the rows and mark the unreadable ones; returns those as ``(index, message)``."""
        if self.failure:
            raise BadInputError(self.failure)
        for _, row, message in self.errors:
            writer.write_error(row, message)
        if self.results is not None:
            writer.write_rows(self.rows, self.results)
        return [(idx, message) for idx, _, message in self.errors]

    @property
    def count(self) -> int:
        return len(self.errors) + len(self.rows)


def _explain_rows(batch: dict, row_of: dict[int, int], explainer: _BatchExplainer) -> _BatchRows:
    errors = [(idx, row_of[idx], message) for idx, message in batch["errors"]]
    if "image" not in batch:
        return _BatchRows(np.zeros(0, np.int64), None, errors)
    return _BatchRows(np.array([row_of[int(i)] for i in batch["index"]]), explainer(batch), errors)


def _scan_pending(writer: ScanWriter, loader, row_of: dict[int, int], explainer: _BatchExplainer, completed: int, total: int,
                  on_progress) -> list[tuple[int, str]]:
    """Run ``loader``'s batches through ``explainer``; record unreadable samples; returns them."""
    skipped: list[tuple[int, str]] = []
    if on_progress:
        on_progress(completed, total)
    for batch in loader:
        part = _explain_rows(batch, row_of, explainer)
        skipped += part.write(writer)
        completed += part.count
        if on_progress:
            on_progress(completed, total)
    return skipped


def _scan_shared(writer: ScanWriter | None, loader, row_of: dict[int, int], explainer: _BatchExplainer, steps: int,
                 completed: int, total: int, on_progress) -> list[tuple[int, str]]:
    """:func:`_scan_pending` across a process group: ``steps`` rounds, in each every rank explains
    its next batch (or nothing) and rank 0 gathers and writes them all; a failure anywhere stops
    every rank at the end of that round."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    batches = iter(loader)
    skipped: list[tuple[int, str]] = []
    for _ in range(steps):
        batch = next(batches, None)
        try:
            part = _explain_rows(batch, row_of, explainer) if batch is not None else None
        except BadInputError as exc:
            part = _BatchRows(np.zeros(0, np.int64), None, [], failure=str(exc))
        parts = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        status = [None]
        if rank == 0:
            try:
                for p in filter(None, parts):
                    skipped += p.write(writer)
                    completed += p.count
            except BadInputError as exc:
                status = [str(exc)]
            if on_progress:
                on_progress(completed, total)
        dist.broadcast_object_list(status, src=0)
        if status[0]:
            raise BadInputError(status[0])
    return skipped


def _open_or_create(out, meta, options, overwrite, manifest, net, capture, layers, prep, targets,
                    heatmap_size, config, dev) -> ScanWriter:
    if out.exists() and not overwrite:
        writer = ScanWriter.resume(out, options, meta["checkpoint_sha256"], len(manifest))
        if writer is None:
            raise UsageError(f"{out} exists from a scan with other options or another model; "
                             "pass --overwrite to replace it or choose another --out")
        return writer
    out.parent.mkdir(parents=True, exist_ok=True)
    channels = _layer_channels(net, capture, layers, prep, dev)
    return ScanWriter.create(out, manifest.samples, config["num_classes"], manifest.multilabel, meta, channels,
                             list(targets), heatmap_size, prototype_maps=options["prototype_maps"])


def _layer_channels(net, capture, layers, prep, dev) -> dict[str, int]:
    """Channel count of each layer, from one dummy forward pass."""
    with torch.no_grad(), capture.attached(net):
        net(torch.zeros(1, prep.channels, prep.size, prep.size, device=dev))
    shapes = {l: capture.outputs[l].shape for l in layers}
    capture.reset()
    return {l: int(s[1] if len(s) == 4 else s[-1]) for l, s in shapes.items()}



def _pool(heat: torch.Tensor, size: int) -> torch.Tensor:
    """Sum-pool ``(N, H, W)`` to ``(N, size, size)`` so stored heatmaps keep their total relevance."""
    h, w = heat.shape[-2:]
    if (h, w) == (size, size):
        return heat
    return F.adaptive_avg_pool2d(heat[:, None], size)[:, 0] * (h * w / (size * size))
