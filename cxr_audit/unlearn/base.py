"""What a mitigation is: a training-loss term plus what it needs to compute it.

A :class:`Mitigation` gets a batch and the model and returns the logits and a penalty; the
engine adds ``lambda_ * penalty`` to the (optionally group-balanced) cross-entropy. Methods that
act on activations instead of the loss (A-ClArC) install forward hooks in :meth:`prepare`;
P-ClArC changes the model only at inference and trains nothing.

Shapes: ``x (N, C, H, W)``, ``logits (N, K)``, masks ``(N, 1, H, W)`` in [0, 1], CAV ``(C_l,)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from cxr_audit.data.dataset import Preprocessing
from cxr_audit.data.manifest import Manifest
from cxr_audit.errors import UsageError
from cxr_audit.options import typed_options
from cxr_audit.training.objective import LossTerm


@dataclass
class Context:
    """Everything a mitigation may need, gathered once by :func:`cxr_audit.unlearn.pipeline.unlearn`.

    ``artifact`` maps manifest row index -> 0/1 (from annotations or the manifest column);
    ``cav`` is a unit direction at ``layer``; ``cav_scores`` are the annotation's projections
    ``v · maxpool(a)`` per manifest index (used for ClArC's reference values).
    """

    num_classes: int
    layer: str | None = None
    cav: torch.Tensor | None = None
    artifact: dict[int, int] = field(default_factory=dict)
    cav_scores: dict[int, float] = field(default_factory=dict)
    has_artifact_masks: bool = False
    has_foreground_masks: bool = False
    options: dict = field(default_factory=dict)
    data: TrainingData | None = None
    #: multi-label models: the finding being unlearned; the methods then see a binary task
    #: (positive / negative for that finding, :func:`task_labels`) while the loss stays over all
    finding: int | None = None


def task_labels(labels: torch.Tensor, finding: int | None) -> torch.Tensor:
    """Class ids ``(N,)`` of the task a mitigation acts on: ``labels`` as is (single-label), or
    1/0 for "has the finding" from multi-hot ``labels (N, K)``."""
    if finding is None:
        return labels
    return (labels[:, finding] > 0.5).long()


def task_class(sample, finding: int | None) -> int:
    """The class id of one manifest ``sample`` in that task (see :func:`task_labels`)."""
    return sample.label if finding is None else int(finding in sample.labels)


def task_logits(logits: torch.Tensor, finding: int | None) -> torch.Tensor:
    """``(N, K)`` as is, or ``(N, 2)`` = ``[0, logit_finding]`` so that argmax is "logit > 0"."""
    if finding is None:
        return logits
    return torch.stack([torch.zeros_like(logits[:, finding]), logits[:, finding]], 1)


@dataclass
class TrainingData:
    """What methods that fit in closed form (DFR) or inspect the input model first (JTT) read:
    the training split, how to load it, and the validation objective (``score_logits``,
    ``clean_logits``, ``images``, ``inserted``; see :class:`cxr_audit.unlearn.pipeline.Validation`)."""

    train_set: Manifest
    prep: Preprocessing
    device: torch.device
    batch_size: int = 32
    seed: int = 0
    validation: object | None = None


class Mitigation(LossTerm):
    """Base class: plain cross-entropy, no penalty (a :class:`~cxr_audit.training.objective.LossTerm`
    that also says what it needs and which options it takes).

    Subclasses set ``name``, ``needs`` (any of ``"cav"``, ``"artifact_mask"``, ``"mask"``,
    ``"artifact_labels"``), ``default_lambdas`` (the sweep grid; empty = no strength to tune),
    ``option_types`` (the options ``--option KEY=VALUE`` may set, with their types), and
    override :meth:`forward` (a loss term), :meth:`prepare` (an edit without training) or
    :meth:`training_groups` (a sampling scheme).
    """

    name = "none"
    needs: tuple[str, ...] = ()
    default_lambdas: tuple[float, ...] = ()
    #: runs from the same start with other seeds, the best on the validation objective kept
    #: (``--restarts`` overrides): for methods whose one run is a noisy draw
    default_restarts = 1
    trains: bool = True  # False: the method edits the model without training (P-ClArC)
    freeze_by_default: bool = False  # freeze up to the CAV layer unless told otherwise
    #: options every method accepts (set from the CLI's own flags) and this method's own ones
    common_options: dict[str, type] = {"seed": int, "output": str, "cam_layer": str}
    option_types: dict[str, type] = {}
    strength_name = "λ"  # what the sweep varies, for tables
    edit_description = "editing the model"  # what a method that does not train does, for the log
    balance_mode = "resample"  # how :meth:`training_groups` are balanced
    multilabel = False  # acts on one finding of a multi-label model (``Context.finding``)
    #: where a CAV method acts without ``--layer``: the annotation's mask layer (``earliest``)
    #: or the deepest layer its scan recorded (``last``)
    default_layer = "earliest"
    #: with no artifact in the data the penalty is ~0 (or the method refuses); ``False`` for a
    #: term that also acts on clean data (ISNet's foreground-relevance band), tested as such
    inert_without_artifact = True

    def __init__(self, **options):
        self.options = typed_options(f"--method {self.name}", {**self.common_options, **self.option_types}, options,
                                     listed=self.option_types)

    def training_groups(self, model: nn.Module, context: Context):
        """Group id per training sample ``(N,)`` that the engine balances (:attr:`balance_mode`),
        or ``None`` (the default; ``--balance`` decides)."""
        return None

    def sample_weights(self, groups):
        """Per-sample weights ``(N,)`` for :meth:`training_groups`, or ``None`` (equal group mass)."""
        return None

    def summary(self) -> dict:
        """What the checkpoint's ``unlearn`` record should add about this run (e.g. DFR's C)."""
        return dict(getattr(self, "record", {}))

    def check(self, context: Context) -> None:
        """Raise :class:`UsageError` naming what is missing, before any training starts."""
        missing = {
            "cav": context.cav is None,
            "artifact_mask": not context.has_artifact_masks,
            "mask": not context.has_foreground_masks,
            "artifact_labels": not context.artifact,
        }
        hints = {
            "cav": "a concept direction: pass --annotations ANN.h5 from `cxr-audit annotate`",
            "artifact_mask": "artifact masks: an `artifact_mask` column (from `inject`, or the annotated.csv "
                             "that `cxr-audit annotate --masks DIR` writes)",
            "mask": "foreground (lung) masks: a `mask` column in the manifest",
            "artifact_labels": "artifact labels: an `artifact` column or --annotations ANN.h5",
        }
        for need in self.needs:
            if missing[need]:
                raise UsageError(f"--method {self.name} needs {hints[need]}")
        if "artifact_labels" in self.needs and not any(context.artifact.values()):
            raise UsageError(f"--method {self.name}: no training sample is labelled as carrying the artifact "
                             "(artifact column or --annotations): nothing to unlearn")

    @property
    def loads_masks(self) -> bool:
        return bool({"artifact_mask", "mask"} & set(self.needs))


def require_grad_output(module: nn.Module, store: dict, key: str = "act"):
    """Forward hook keeping ``module``'s output in ``store[key]`` as a graph node we can
    differentiate with respect to, even when everything before it is frozen."""

    def hook(_module, _inputs, output):
        if not output.requires_grad:
            output = output.detach().requires_grad_(True)
        store[key] = output
        return output

    return module.register_forward_hook(hook)


def target_logits(logits: torch.Tensor, y: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A scalar output to differentiate per sample, ``(N,)``.

    ``random``: ``Σ_k s_k f_k`` with signs ``s ∈ {±1}`` redrawn each call (Dreyer et al., 2024);
    ``target``: the true-class logit; ``max``: the largest logit; ``logprob``: ``Σ_k log p_k``
    (Ross et al., 2017).
    """
    if mode == "random":
        signs = torch.randint(0, 2, logits.shape, generator=generator, device="cpu").to(logits) * 2 - 1
        return (logits * signs).sum(1)
    if mode == "target":
        return logits.gather(1, y.view(-1, 1).long()).squeeze(1)
    if mode == "max":
        return logits.max(1).values
    if mode == "logprob":
        return torch.log_softmax(logits, 1).sum(1)
    raise UsageError(f"unknown output target '{mode}' (random, target, max, logprob)")
