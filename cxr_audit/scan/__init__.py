"""Stage 1, ``cxr-audit scan``: activations, relevances and predictions of a model on a data set, into a
resumable HDF5 scan (:mod:`cxr_audit.store`).

Public entry: :func:`cxr_audit.scan.pipeline.scan` (``from cxr_audit.scan import scan``, imported lazily so that
importing a submodule stays light and free of cycles).
"""


def __getattr__(name: str):
    if name == "scan":
        from cxr_audit.scan.pipeline import scan

        return scan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
