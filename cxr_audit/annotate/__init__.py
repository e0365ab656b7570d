"""Stage 3, ``cxr-audit annotate``: label artifact samples and localize the artifact from a scan with
near-zero manual work (CAV scores, Otsu, CRP masks) into an annotation file.

Public entry: :func:`cxr_audit.annotate.pipeline.annotate` (``from cxr_audit.annotate import annotate``, imported lazily so that
importing a submodule stays light and free of cycles).
"""


def __getattr__(name: str):
    if name == "annotate":
        from cxr_audit.annotate.pipeline import annotate

        return annotate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
