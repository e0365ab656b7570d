"""Stage 2, ``cxr-audit reveal``: rank concepts, flag source-linked ones, cluster explanations (SpRAy),
audit prototypes, write reveal.json and the HTML report.

Public entry: :func:`cxr_audit.reveal.pipeline.reveal` (``from cxr_audit.reveal import reveal``, imported on first use).
"""

from cxr_audit import stage_entry

__getattr__ = stage_entry(__name__, "reveal")
