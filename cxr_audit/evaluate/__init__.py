"""``cxr-audit evaluate``: accuracy, worst-group and artifact-insertion metrics, relevance on the
artifact and faithfulness of a model (and of its unlearned versions).

Public entry: :func:`cxr_audit.evaluate.pipeline.evaluate` (``from cxr_audit.evaluate import evaluate``, imported lazily so that
importing a submodule stays light and free of cycles).
"""


def __getattr__(name: str):
    if name == "evaluate":
        from cxr_audit.evaluate.pipeline import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
