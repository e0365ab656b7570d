"""``cxr-audit gate``: the CI check that a model has not (re)learned a known shortcut.

Public entry: :func:`cxr_audit.gate.pipeline.gate` (``from cxr_audit.gate import gate``, imported on first use).
"""

from cxr_audit import stage_entry

__getattr__ = stage_entry(__name__, "gate")
