"""Stage 3, ``cxr-audit annotate``: label artifact samples and localize the artifact from a scan with
near-zero manual work (CAV scores, Otsu, CRP masks) into an annotation file.

Public entry: :func:`cxr_audit.annotate.pipeline.annotate` (``from cxr_audit.annotate import annotate``, imported on first use).
"""

from cxr_audit import stage_entry

__getattr__ = stage_entry(__name__, "annotate")
