"""``cxr-audit evaluate``: accuracy, worst-group and artifact-insertion metrics, relevance on the
artifact and faithfulness of a model (and of its unlearned versions).

Public entry: :func:`cxr_audit.evaluate.pipeline.evaluate` (``from cxr_audit.evaluate import evaluate``, imported on first use).
"""

from cxr_audit import stage_entry

__getattr__ = stage_entry(__name__, "evaluate")
