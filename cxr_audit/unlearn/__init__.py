"""Mitigations for ``cxr-audit unlearn``: one class per method, registered by name.

Adding a method is one new file with a :class:`~cxr_audit.unlearn.base.Mitigation` subclass and
one line in :data:`MITIGATIONS`. Group balancing (``--balance``) composes with every method.
Stage 4's public entry: :func:`cxr_audit.unlearn.pipeline.unlearn` (``from cxr_audit.unlearn import
unlearn``, imported lazily).
"""

from cxr_audit import options as options_module  # not `choice`: the package has a submodule of that name
from cxr_audit import stage_entry
from cxr_audit.training.balance import BALANCE_MODES, GroupBalance
from cxr_audit.unlearn.augment import Augment
from cxr_audit.unlearn.base import Context, Mitigation
from cxr_audit.unlearn.clarc import AClArC, PClArC, ReactivePClArC
from cxr_audit.unlearn.dfr import DFR
from cxr_audit.unlearn.exbl import EXBL
from cxr_audit.unlearn.isnet import ISNet
from cxr_audit.unlearn.jtt import JTT
from cxr_audit.unlearn.rrclarc import RRClArC
from cxr_audit.unlearn.rrr import RRR


class Plain(Mitigation):
    """Plain fine-tuning, the control every method is measured against; any model."""

    name = "none"
    multilabel = True


class Balance(Mitigation):
    """Plain fine-tuning whose only change is group balancing (``--balance reweight`` unless set)."""

    name = "balance"


MITIGATIONS: dict[str, type[Mitigation]] = {
    cls.name: cls for cls in (DFR, Augment, Plain, RRR, RRClArC, PClArC, ReactivePClArC, AClArC, ISNet, EXBL, JTT, Balance)
}


def get_mitigation(name: str, **options) -> Mitigation:
    return MITIGATIONS[options_module.choice("--method", name, MITIGATIONS)](**options)


__getattr__ = stage_entry(__name__, "unlearn")


__all__ = ["BALANCE_MODES", "Context", "GroupBalance", "MITIGATIONS", "Mitigation", "get_mitigation"]
