"""Training shared by ``train``, ``unlearn`` and ``stress``: the loop (:mod:`.engine`) and the
``train`` command's pipeline (:mod:`.pipeline`).

Public entry: :func:`cxr_audit.training.pipeline.train` (``from cxr_audit.training import train``, imported on first use).
"""

from cxr_audit import stage_entry

__getattr__ = stage_entry(__name__, "train")
