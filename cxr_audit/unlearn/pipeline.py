"""``unlearn``: change a checkpoint so it stops using a shortcut, and prove it on validation.

1. Gather what the method needs (:class:`~cxr_audit.unlearn.base.Context`): the CAV and artifact
   labels of an ``annotate`` output, artifact masks and lung masks from the manifest, the
   training split and the validation objective (:mod:`cxr_audit.unlearn.validation`).
2. Methods that fit in closed form (DFR) or only edit the model (P-ClArC) do so; methods that
   fine-tune get their strength λ from :mod:`cxr_audit.unlearn.sweep` when none is given.
3. Judge the result on the validation objective against the input model. A result that is worse
   is not written (:class:`NotImprovedError`): the input stays as it is and the message names
   what to try. Otherwise save a checkpoint that records the method, λ, the sweep, the before
   and after figures, the source checkpoint and every option.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxr_audit.annotate.store import read_annotations
from cxr_audit.data.dataset import CxrDataset, collate, load_batch
from cxr_audit.data.manifest import Manifest, load_manifest
from cxr_audit.errors import CxrAuditError, UsageError
from cxr_audit.models.architectures import spec_of
from cxr_audit.models.registry import file_sha256, load_checkpoint, preprocessing_of, save_checkpoint
from cxr_audit.options import choice
from cxr_audit.runtime import (
    init_distributed,
    is_main_process,
    now,
    prefixed,
    resolve_device,
    seed_everything,
    versions,
)
from cxr_audit.training.balance import group_ids
from cxr_audit.training.engine import fit
from cxr_audit.unlearn import MITIGATIONS, Context, GroupBalance, get_mitigation
from cxr_audit.unlearn.base import TrainingData, task_labels
from cxr_audit.unlearn.choice import CLEAN_BOUND, choose_run
from cxr_audit.unlearn.sweep import sweep_runs
from cxr_audit.unlearn.validation import Validation, artifact_free_share, at_chance, cav_labels

DEFAULT_METHOD = "augment"
#: tried in turn when the method's result is refused (measured on vgg11 with a marker, where
#: fine-tuning loses the lesion with the marker: docs/unlearn.md). Reactive P-ClArC edits only
#: the images where the artifact is detected, so clean images keep their predictions; DFR only
#: retrains the last layer, so it keeps the features a fine-tune can lose.
DEFAULT_FALLBACK = "rpclarc,dfr"


class NotImprovedError(CxrAuditError):
    """The unlearned model scores worse than its input on the validation objective (exit code 3).
    ``summary``: the figures that say so; ``advice``: what to try; ``input_at_chance``: the input
    is at chance without the artifact (nothing a mitigation could keep)."""

    exit_code = 3

    def __init__(self, summary: str, advice: str, input_at_chance: bool = False):
        super().__init__(f"{summary}; nothing was written, the input is unchanged. {advice}")
        self.summary, self.advice, self.input_at_chance = summary, advice, input_at_chance


@dataclass
class UnlearnResult:
    checkpoint: Path
    method: str
    lambda_: float | None
    sweep: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    seconds_per_step: float = 0.0
    before: dict = field(default_factory=dict)  # validation figures of the input model
    after: dict = field(default_factory=dict)  # ... and of the written one
    objective: str = "none"
    strength_name: str = "λ"
    fallback_from: str | None = None  # the method that was refused before this one ran


@dataclass
class _Outcome:
    """What a method's run produced: the λ it used, the sweep, the history, checkpoint extras."""

    lambda_: float | None = None
    sweep: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    seconds_per_step: float = 0.0
    extra: dict | None = None
    summary: dict | None = None  # the kept run's mitigation.summary() when a sweep made it


@dataclass(frozen=True)
class UnlearnOptions:
    """Every option of one ``unlearn`` run, declared once (the CLI, the benchmark and the
    fallback pass them as keywords of :func:`unlearn`).

    ``target``: ``finding:NAME`` — required for multi-label models: the finding whose shortcut
    is removed (the loss stays over every finding; the method and the validation objective see
    that finding's positives and negatives).

    ``options``: method-specific options (e.g. ``{"C": 0.1}`` for DFR, ``{"per_position": False}``
    for RR-ClArC), checked against the method's declared option types. ``keep_worse``: write the
    result even when it is worse than the input on the validation objective (otherwise
    :class:`NotImprovedError`, nothing written).

    ``lr``: default the architecture's recommended rate (1e-3; 1e-4 for VGG, which has no
    BatchNorm and collapses when fine-tuned at 1e-3: measured in the mitigation benchmark).

    ``freeze``: ``auto`` (up to the CAV layer for methods that need it, e.g. RR-ClArC),
    ``none``, or a layer name. ``output`` selects what RR-ClArC/RRR differentiate
    (``random``, ``target``, ``max``, ``logprob``).

    ``layer``: where the ClArC methods act (default: the earliest layer the annotation's scan
    recorded, the layer its masks were painted at). ``cav_method``/``cav_scope``: the CAV is
    refitted there from the annotation's labels, by default as a signal (pattern) CAV on the
    samples of the artifact's class only (``cav_scope="class"``; ``"all"`` fits on every sample).
    Why (the gradient penalty needs the direction the artifact *moves* activations, Pahde et al.
    2023, and within one class that difference is not confounded with the class's features):
    docs/unlearn.md.

    ``fallback_from``: the method refused before this run (recorded in the checkpoint).
    """

    annotations: str | Path | None = None
    layer: str | None = None
    cav_method: str = "signal"
    cav_scope: str = "class"
    lambda_: float | None = None
    lambdas: list[float] | None = None
    balance: str = "none"
    freeze: str = "auto"
    output: str | None = None
    options: dict | None = None
    epochs: int = 5
    sweep_epochs: int | None = None
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 1e-4
    patience: int | None = None
    restarts: int | None = None
    train_split: str = "train"
    val_split: str = "val"
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    cam_layer: str | None = None
    keep_worse: bool = False
    target: str | None = None
    fallback_from: str | None = None

    @classmethod
    def of(cls, settings: dict) -> "UnlearnOptions":
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise UsageError(f"unknown unlearn option(s) {', '.join(unknown)}")
        return cls(**settings)

    def method_options(self) -> dict:
        """The options a mitigation is created with: the common ones that are set, then its own."""
        common = {"output": self.output, "seed": self.seed, "cam_layer": self.cam_layer}
        return {**{k: v for k, v in common.items() if v is not None}, **(self.options or {})}


def unlearn(model: str | Path, data: str | Path, out: str | Path, method: str = DEFAULT_METHOD, *,
            fallback: str | None = DEFAULT_FALLBACK, on_progress: Callable[..., None] | None = None,
            on_stage: Callable[[str], None] | None = None, **settings) -> UnlearnResult:
    """Remove the shortcut from ``model`` with mitigation ``method`` on ``data``; write ``out``.
    ``settings``: the fields of :class:`UnlearnOptions`.

    When the result is refused (worse than the input on the validation objective) and the input
    has signal beyond the artifact, the ``fallback`` methods (comma-separated; default
    ``rpclarc,dfr``) are tried in turn, each without ``method``'s own options, until one is not
    refused; a fallback that needs a CAV is skipped without ``annotations``. ``None``: refuse at
    once. The result's ``fallback_from`` names the refused method."""
    opts = UnlearnOptions.of(settings)
    chain = [choice("--fallback", name.strip(), MITIGATIONS) for name in (fallback or "").split(",") if name.strip()]
    say = on_stage or (lambda _: None)
    try:
        return unlearn_once(model, data, out, method, opts, on_progress, say)
    except NotImprovedError as refused:
        if refused.input_at_chance:
            raise
        return _fall_back(refused, [name for name in chain if _can_fall_back(name, method, opts)], model, data, out,
                          method, opts, on_progress, say)


def _can_fall_back(name: str, method: str, opts: UnlearnOptions) -> bool:
    mitigation = MITIGATIONS[name]
    return (name != method and (opts.target is None or mitigation.multilabel)
            and ("cav" not in mitigation.needs or opts.annotations is not None))


def _fall_back(refused: NotImprovedError, chain: list[str], model, data, out, method: str, opts: UnlearnOptions,
               on_progress, say) -> UnlearnResult:
    """The first of ``chain`` whose result is not refused; else :class:`NotImprovedError` with
    every refusal."""
    summaries, last, previous = [refused.summary], refused, method
    for name in chain:
        say(f"{previous} was refused ({last.summary}); trying {name}")
        try:
            return unlearn_once(model, data, out, name, replace(opts, options=None, fallback_from=method),
                                on_progress, say)
        except NotImprovedError as again:
            summaries.append(again.summary)
            last, previous = again, name
    if len(summaries) == 1:
        raise refused
    raise NotImprovedError("; then ".join(summaries), last.advice, last.input_at_chance) from None


def unlearn_once(model: str | Path, data: str | Path, out: str | Path, method: str, opts: UnlearnOptions,
                 on_progress: Callable[..., None] | None, say: Callable[[str], None]) -> UnlearnResult:
    """One method, no fallback (see :func:`unlearn`)."""
    _check_inputs(model, out, opts)
    seed_everything(opts.seed)
    net, config = load_checkpoint(model)
    if config.get("projection"):
        raise UsageError(f"{model} already carries a P-ClArC projection; unlearn from the original checkpoint")
    prep = preprocessing_of(config)
    lr = opts.lr if opts.lr is not None else spec_of(config["arch"]).recommended_lr
    dev = init_distributed(resolve_device(opts.device))
    manifest, train_set, val_set = _splits_of(data, config, opts.train_split, opts.val_split)
    mitigation = get_mitigation(method, **opts.method_options())
    context = _checked_context(manifest, train_set, config, mitigation, opts, say)
    start_state = copy.deepcopy(net.state_dict())
    net = net.to(dev)
    say(f"reading the validation split ('{opts.val_split}')" if val_set is not None else "no validation split")
    val_batch = load_batch(val_set, prep, with_masks=False) if val_set is not None else None
    if val_set is not None and opts.annotations is not None:
        context.artifact.update(_validation_artifact_labels(net, train_set, val_set, val_batch, context, opts))
    validation = (Validation(train_set, val_set, prep, dev, context, opts.batch_size, opts.seed, val_batch)
                  if val_set is not None else None)
    context.data = TrainingData(train_set, prep, dev, opts.batch_size, opts.seed, validation)
    before = validation.summary(net) if validation else {}
    _note_no_reliance(before, say)
    run = dict(context=context, balance=_balance(method, opts.balance, train_set, context, mitigation, net),
               batch_size=opts.batch_size, lr=lr, weight_decay=opts.weight_decay, seed=opts.seed, amp=opts.amp,
               freeze=_freeze_layer(opts.freeze, mitigation, context), num_workers=opts.num_workers)
    if not mitigation.trains:
        say(f"{method}: {mitigation.edit_description} (no training)")
        loader = DataLoader(CxrDataset(train_set, prep, with_masks=False), batch_size=opts.batch_size,
                            collate_fn=collate)
        mitigation.prepare(net, context, loader)
        outcome = _Outcome(sweep=list(getattr(mitigation, "sweep", [])))
    else:
        outcome = _fine_tune(net, start_state, train_set, prep, dev, mitigation, validation, run, say, opts,
                             on_progress)
    if outcome.extra is None:
        outcome.extra = mitigation.finish(net)
    after = _after(net, outcome.extra, validation)
    if after and len(outcome.sweep) > 1:  # the best of several runs: the chance test allows for luck
        after["chosen_from"] = len(outcome.sweep)
    # a fallback must improve on the input: one that changes nothing (e.g. reactive P-ClArC that
    # detects no artifact) is no fix to present, and the next fallback may still help
    _refuse_if_worse(method, before, after, opts.keep_worse, validation, context.num_classes,
                     need_gain=opts.fallback_from is not None)
    record = _record(method, opts, model, data, outcome, validation, before, after, run, context, mitigation)
    if is_main_process():  # under torchrun every rank holds the same weights; one writes them
        save_checkpoint(out, net, config["arch"], config["class_names"], prep,
                        extra={**outcome.extra, "unlearn": record, "history": outcome.history, "created": now(),
                               "versions": versions()})
    return UnlearnResult(Path(out), method, outcome.lambda_, outcome.sweep, outcome.history, outcome.seconds_per_step,
                         before, after, record["objective"], mitigation.strength_name, opts.fallback_from)


def _validation_artifact_labels(net, train_set: Manifest, val_set: Manifest, val_batch: dict, context: Context,
                                opts: UnlearnOptions) -> dict[int, int]:
    """Which validation images carry the artifact, where neither the manifest nor the annotation
    says: by the annotation's CAV, no class left with more artifact-free images than its share
    in the annotated training split (:func:`~cxr_audit.unlearn.validation.cav_labels`)."""
    classes = task_labels(val_batch["label"], context.finding).tolist()
    share = artifact_free_share(train_set, context.artifact, context.finding)
    return cav_labels(net, val_set, val_batch["image"], opts.annotations, opts.batch_size, context.artifact,
                      classes, share)


def _check_inputs(model, out, opts: UnlearnOptions) -> None:
    if Path(out).resolve() == Path(model).resolve():
        raise UsageError(f"--out {out} is the input model: write the unlearned model to a new file")
    if any(lam < 0 for lam in ([opts.lambda_] if opts.lambda_ is not None else []) + list(opts.lambdas or [])):
        raise UsageError("--lambda must be >= 0: a negative penalty rewards the shortcut")


def _checked_context(manifest, train_set, config, mitigation, opts: UnlearnOptions, say) -> Context:
    """The method's :class:`Context` (annotation, finding), checked against what it needs."""
    context = _context(manifest, train_set, config, opts.annotations, opts.layer, opts.cav_method, opts.cav_scope,
                       mitigation.default_layer)
    context.finding = _finding(opts.target, manifest, mitigation.name)
    if context.finding is not None:
        context.num_classes = 2  # the finding's negatives and positives
        if opts.balance != "none":
            raise UsageError("--balance is for single-label models (its groups are classes)")
    mitigation.check(context)
    _note_weak_annotation(context, say)
    return context


def _record(method, opts: UnlearnOptions, model, data, outcome: _Outcome, validation, before, after, run, context,
            mitigation) -> dict:
    """What the checkpoint records of the run: every option, as resolved, and the figures."""
    return {"method": method, "lambda": outcome.lambda_, "lambda_sweep": outcome.sweep,
            "objective": validation.description if validation else "none", "before": before, "after": after,
            "balance": run["balance"].mode if run["balance"] else "none", "freeze": run["freeze"],
            "layer": context.layer, "annotations": str(Path(opts.annotations).resolve()) if opts.annotations else None,
            "cav_method": opts.cav_method, "cav_scope": opts.cav_scope, "source_checkpoint": str(Path(model).resolve()),
            "source_sha256": file_sha256(model), "data": str(Path(data).resolve()), "epochs": opts.epochs,
            "sweep_epochs": opts.sweep_epochs, "batch_size": opts.batch_size, "lr": run["lr"],
            "weight_decay": opts.weight_decay, "seed": opts.seed, "amp": opts.amp, "target": opts.target,
            "fallback_from": opts.fallback_from, **opts.method_options(),
            **(outcome.summary if outcome.summary is not None else mitigation.summary())}


def _splits_of(data, config: dict, train_split: str, val_split: str) -> tuple[Manifest, Manifest, Manifest | None]:
    """``(manifest, training split, validation split or None)``."""
    manifest = load_manifest(data, class_names=config["class_names"], multilabel=config.get("multilabel", False))
    train_set = manifest.subset(train_split) if _has_splits(manifest) else manifest
    val_set = manifest.subset(val_split) if _has_splits(manifest) and val_split in _splits(manifest) else None
    return manifest, train_set, val_set


def _note_no_reliance(before: dict, say) -> None:
    if before.get("inserted_balanced_accuracy", 0.0) >= before.get("clean_balanced_accuracy", 1.0) - 0.02:
        say(f"note: on validation the input model does not rely on the annotated artifact (balanced accuracy "
            f"{before['clean_balanced_accuracy']:.3f} without it, {before['inserted_balanced_accuracy']:.3f} with it "
            "inserted): there may be nothing to unlearn")


def _note_weak_annotation(context: Context, say) -> None:
    """A CAV that retrieves held-out artifact samples poorly paints poor masks, and methods that
    paste or penalise by the masks then act on whatever they cover (measured: a vgg11 that had
    not learned the stamp got masks on the lesions, and `augment` unlearned the lesions)."""
    held_out = context.options.get("annotation_quality", {}).get("retrieval_held_out", {})
    if isinstance(held_out, dict) and held_out.get("auroc", 1.0) < 0.8:
        say(f"note: the annotation's CAV retrieves held-out artifact samples with AUROC {held_out['auroc']:.2f} "
            "only: its masks may not cover the artifact; check annotate's contact_sheet.png")


def _finding(target: str | None, manifest: Manifest, method: str) -> int | None:
    """The finding index a multi-label run unlearns; checks that the method can."""
    from cxr_audit.store.schema import finding_index

    if not manifest.multilabel:
        if target is not None:
            raise UsageError("--target finding:NAME is for multi-label models; this one is single-label")
        return None
    if target is None:
        raise UsageError(f"a multi-label model: say which finding's shortcut to remove with --target finding:NAME "
                         f"({', '.join(manifest.class_names)})")
    supported = [name for name, cls in MITIGATIONS.items() if cls.multilabel]
    if method in MITIGATIONS and not MITIGATIONS[method].multilabel:
        raise UsageError(f"--method {method} does not support multi-label models yet; use {', '.join(supported)}")
    k = finding_index(target, manifest.class_names)
    if k is None:
        raise UsageError(f"--target must be finding:NAME for unlearn, got '{target}'")
    return k


def _fine_tune(net, start_state, train_set, prep, dev, mitigation, validation, run, say, opts: UnlearnOptions,
               on_progress) -> _Outcome:
    """Train with ``mitigation``: λ from the sweep when ``opts.lambda_`` is None and the method has
    a grid, then the best of the method's restarts (seeds) on the validation objective."""
    method, outcome = mitigation.name, _Outcome(lambda_=opts.lambda_)
    grid = opts.lambdas or list(mitigation.default_lambdas)
    swept = opts.lambda_ is None and bool(grid)  # λ comes from the sweep
    lambdas = grid if swept else [opts.lambda_ or 0.0]
    seeds = [opts.seed + i for i in range(opts.restarts if opts.restarts is not None else mitigation.default_restarts)]
    if len(lambdas) * len(seeds) > 1 and validation is None:
        raise UsageError(f"choosing λ or a restart for {method} needs a validation split ('{opts.val_split}'); add one "
                         "or pass --lambda and --restarts 1")
    short = opts.sweep_epochs is not None and opts.sweep_epochs < opts.epochs
    if len(lambdas) > 1 and short:  # short runs pick λ; the full runs below pick the restart
        say(_sweep_description(lambdas, seeds[:1], opts.sweep_epochs))
        rows, _ = sweep_runs(net, start_state, train_set, prep, dev, method, opts.method_options(),
                             [(lam, seeds[0]) for lam in lambdas], opts.sweep_epochs, validation, run, opts.patience,
                             prefixed(on_progress, "sweep:"))
        chosen = choose_run(rows)
        if len(seeds) == 1:  # else the restarts below hold the kept run
            chosen["chosen"] = True
        outcome.sweep, lambdas = rows, [chosen["lambda"]]
        net.load_state_dict(start_state)
    candidates = [(lam, seed) for lam in lambdas for seed in seeds]
    if len(candidates) > 1:
        say(_sweep_description(lambdas, seeds, opts.epochs))
        rows, models = sweep_runs(net, start_state, train_set, prep, dev, method, opts.method_options(), candidates,
                                  opts.epochs, validation, run, opts.patience, prefixed(on_progress, "sweep:"),
                                  per_epoch=len(lambdas) > 1)
        chosen = choose_run(rows)
        chosen["chosen"] = True
        best = models[chosen["lambda"], chosen["seed"]]
        net.load_state_dict(best["state"])
        outcome.sweep += rows
        outcome.lambda_ = chosen["lambda"] if swept else opts.lambda_
        outcome.history, outcome.seconds_per_step, outcome.extra, outcome.summary = (
            best["history"], best["seconds_per_step"], best["extra"], best["summary"])
        return outcome
    outcome.lambda_ = lambdas[0] if swept else opts.lambda_
    say(f"fine-tuning with {method}" + (f", λ={outcome.lambda_:g}" if outcome.lambda_ else "")
        + (f", frozen up to {run['freeze']}" if run["freeze"] else ""))
    result = fit(net, train_set, prep, dev, mitigation=mitigation, lambda_=outcome.lambda_ or 0.0, epochs=opts.epochs,
                 val_score=validation.score if validation else None, patience=opts.patience, on_progress=on_progress,
                 **run)
    outcome.history, outcome.seconds_per_step = result.history, result.seconds_per_step
    return outcome


def _sweep_description(lambdas: list[float], seeds: list[int], epochs: int) -> str:
    parts = [f"λ over {', '.join(f'{g:g}' for g in lambdas)}"] if len(lambdas) > 1 else []
    parts += [f"{len(seeds)} restarts (seeds {seeds[0]}–{seeds[-1]})"] if len(seeds) > 1 else []
    return f"sweeping {' × '.join(parts)} ({epochs} epoch(s) each); the best on the validation objective is kept"


def _after(net, extra: dict, validation: Validation | None) -> dict:
    """Validation figures of the result as it will load (with a P-ClArC projection installed)."""
    if validation is None:
        return {}
    if "projection" not in extra:
        return validation.summary(net)
    from cxr_audit.models.projection import install_projection

    handle = install_projection(net, **extra["projection"])
    try:
        return validation.summary(net)
    finally:
        handle.remove()


def refusal(before: dict, after: dict, num_classes: int, need_gain: bool = False) -> str | None:
    """Why ``unlearn`` refuses a result (what it did to the model), or ``None`` when it does not:
    worse than its input on the validation objective (``need_gain``: no better than it); at
    chance without the artifact, whatever the objective gained on the artifact-inserted half
    (measured: a vgg11 that had learned only the stamp, "fixed" to 0.46); or more balanced
    accuracy lost on the artifact-free validation images than both :data:`CLEAN_BOUND` (the λ
    sweep's bound) and the objective's gain — robustness to the artifact bought with more clean
    accuracy than it earned (measured: reactive P-ClArC on densenet121, objective +0.02, clean
    validation −0.17, clean test −0.29; docs/unlearn.md)."""
    if not before or not after:
        return None
    gain = after["objective"] - before["objective"]
    if gain < 0:
        return "made the model worse"
    if need_gain and gain == 0:
        return "did not improve the model"
    if input_at_chance(after, num_classes):
        return "left the model at chance without the artifact"  # or not measurably above it
    lost = before["clean_balanced_accuracy"] - after["clean_balanced_accuracy"]
    if lost > CLEAN_BOUND and lost > gain:
        return "lost more accuracy without the artifact than it gained"
    return None


def input_at_chance(figures: dict, num_classes: int) -> bool:
    """Whether the model of ``figures`` (``before`` or ``after``) is at chance on the
    artifact-free validation images: no signal beyond the artifact
    (:func:`~cxr_audit.unlearn.validation.at_chance`; a result picked from a sweep of ``n`` runs,
    ``figures["chosen_from"]``, is tested as the best of ``n``)."""
    return bool(figures) and at_chance(figures["clean_balanced_accuracy"], figures.get("clean_counts"), num_classes,
                                       figures.get("chosen_from", 1))


def _refuse_if_worse(method: str, before: dict, after: dict, keep_worse: bool, validation, num_classes: int,
                     need_gain: bool = False) -> None:
    verdict = refusal(before, after, num_classes, need_gain)
    if keep_worse or verdict is None:
        return
    inserted = ""
    if "inserted_balanced_accuracy" in before and "inserted_balanced_accuracy" in after:
        inserted = (f", artifact-inserted {before['inserted_balanced_accuracy']:.3f} → "
                    f"{after['inserted_balanced_accuracy']:.3f}")
    no_signal = input_at_chance(before, num_classes)
    advice = _retrain_advice(before) if no_signal else (
        "check the masks (annotate's contact_sheet.png): masks on the class evidence instead of the artifact teach the "
        "model to ignore that evidence; else try another --method (augment, dfr, rrclarc) or more --epochs")
    raise NotImprovedError(
        f"{method} {verdict} on its validation objective ({validation.description}: "
        f"{before['objective']:.3f} → {after['objective']:.3f}; balanced accuracy without the artifact "
        f"{before['clean_balanced_accuracy']:.3f} → {after['clean_balanced_accuracy']:.3f}{inserted})",
        f"{advice[0].upper() + advice[1:]}; --keep-worse writes the result anyway", no_signal)


def _retrain_advice(before: dict) -> str:
    counts = before.get("clean_counts")
    on = f" (on {'/'.join(map(str, counts))} artifact-free validation images per class)" if counts else ""
    return (f"without the artifact the input model is not measurably above chance{on}, so it shows no signal beyond "
            "the artifact: retrain from scratch with `cxr-audit train --balance resample` on the annotated manifest, "
            "and check that the label is visible in images without the artifact")


def _has_splits(manifest: Manifest) -> bool:
    return _splits(manifest) != {""}


def _splits(manifest: Manifest) -> set[str]:
    return {s.split for s in manifest.samples}


def _context(manifest: Manifest, train_set: Manifest, config: dict, annotations, layer, cav_method,
             cav_scope, default_layer: str = "earliest") -> Context:
    context = Context(num_classes=len(config["class_names"]), options={"cam_layer": spec_of(config["arch"]).cam_layer})
    context.artifact = {s.index: int(s.artifact) for s in manifest.samples if s.artifact is not None}
    if annotations is not None:
        if layer is None:
            layer = _scanned_layer(annotations, default_layer)
        if cav_scope not in ("class", "all"):
            raise UsageError(f"--cav-scope must be 'class' or 'all', got '{cav_scope}'")
        ann = read_annotations(annotations, layer, None if cav_method == "annotation" else cav_method,
                               within_class=cav_scope == "class")
        ann.check_samples(train_set.samples)
        context.layer, context.cav = ann.layer, torch.from_numpy(ann.cav)
        context.artifact.update(ann.labels)
        context.cav_scores = ann.scores
        context.options["annotation_quality"] = ann.meta.get("quality", {})
    elif layer is not None:
        context.layer = layer
    context.has_artifact_masks = any(s.artifact_mask is not None for s in train_set.samples)
    context.has_foreground_masks = all(s.mask is not None for s in train_set.samples)
    return context


def _scanned_layer(annotations, which: str) -> str | None:
    """``which="earliest"``: the annotation's mask layer (the earliest layer its scan recorded);
    ``"last"``: the last layer the scan recorded (the deepest); ``None`` when unreadable."""
    from cxr_audit.store.annotation_file import annotation_meta
    from cxr_audit.store.scan_file import ScanFile

    try:
        meta = annotation_meta(annotations)
        if which == "earliest":
            return meta["options"].get("mask_layer")
        with ScanFile(str(meta["scan"])) as scan:
            return list(scan.meta["layers"])[-1]
    except (CxrAuditError, KeyError, ValueError, IndexError):
        return None  # read_annotations reports unreadable files with a proper message


def _balance(method: str, mode: str, train_set: Manifest, context: Context, mitigation,
             net) -> GroupBalance | None:
    """Group balancing from ``--balance``, or the groups the method itself balances (JTT's error set)."""
    index = np.array([s.index for s in train_set.samples])
    own = mitigation.training_groups(net, context)
    if own is not None:
        if mode != "none":
            raise UsageError(f"--method {method} sets its own sampling; drop --balance {mode}")
        if len(np.unique(own)) < 2:  # e.g. JTT without training errors: uniform sampling
            return None
        return GroupBalance(mitigation.balance_mode).fit(own, index, mitigation.sample_weights(own))
    if method == "balance" and mode == "none":
        mode = "reweight"
    if mode == "none":
        return None
    groups, _ = group_ids(train_set, context.artifact)
    return GroupBalance(mode).fit(groups, index)


def _freeze_layer(freeze: str, mitigation, context: Context) -> str | None:
    if freeze == "none":
        return None
    if freeze == "auto":
        return context.layer if mitigation.freeze_by_default else None
    return freeze


