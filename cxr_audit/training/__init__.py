"""Training shared by ``train``, ``unlearn`` and ``stress``: the loop (:mod:`.engine`) and the
``train`` command's pipeline (:mod:`.pipeline`).

Public entry: :func:`cxr_audit.training.pipeline.train` (``from cxr_audit.training import train``, imported lazily so that
importing a submodule stays light and free of cycles).
"""


def __getattr__(name: str):
    if name == "train":
        from cxr_audit.training.pipeline import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
