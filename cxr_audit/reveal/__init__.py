"""Stage 2, ``cxr-audit reveal``: rank concepts, flag source-linked ones, cluster explanations (SpRAy),
audit prototypes, write reveal.json and the HTML report.

Public entry: :func:`cxr_audit.reveal.pipeline.reveal` (``from cxr_audit.reveal import reveal``, imported lazily so that
importing a submodule stays light and free of cycles).
"""


def __getattr__(name: str):
    if name == "reveal":
        from cxr_audit.reveal.pipeline import reveal

        return reveal
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
