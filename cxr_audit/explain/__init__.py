from cxr_audit.explain.capture import LayerCapture
from cxr_audit.explain.core import BatchExplanation, conditional_heatmaps, explain_batch, layer_attribution
from cxr_audit.explain.methods import METHODS, create_method, default_layers

__all__ = ["LayerCapture", "BatchExplanation", "explain_batch", "conditional_heatmaps", "layer_attribution",
           "METHODS", "create_method", "default_layers"]
