"""``cxr-audit stress``: the xH1–yH2 training-mix sweep (Gautam et al., 2022) with any architecture.

Public entry: :func:`cxr_audit.stress.pipeline.stress` (``from cxr_audit.stress import stress``, imported lazily so that
importing a submodule stays light and free of cycles).
"""


def __getattr__(name: str):
    if name == "stress":
        from cxr_audit.stress.pipeline import stress

        return stress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
