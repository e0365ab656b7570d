"""``cxr-audit gate``: the CI check that a model has not (re)learned a known shortcut.

Public entry: :func:`cxr_audit.gate.pipeline.gate` (``from cxr_audit.gate import gate``, imported lazily so that
importing a submodule stays light and free of cycles).
"""


def __getattr__(name: str):
    if name == "gate":
        from cxr_audit.gate.pipeline import gate

        return gate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
