"""``cxr-audit stress``: the xH1–yH2 training-mix sweep (Gautam et al., 2022) with any architecture.

Public entry: :func:`cxr_audit.stress.pipeline.stress` (``from cxr_audit.stress import stress``, imported on first use).
"""

from cxr_audit import stage_entry

__getattr__ = stage_entry(__name__, "stress")
