"""Stage 1, ``cxr-audit scan``: activations, relevances and predictions of a model on a data set, into a
resumable HDF5 scan (:mod:`cxr_audit.store`).

Public entry: :func:`cxr_audit.scan.pipeline.scan` (``from cxr_audit.scan import scan``, imported on first use).
"""

from cxr_audit import stage_entry

__getattr__ = stage_entry(__name__, "scan")
