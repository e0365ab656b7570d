from cxr_audit.models.registry import ARCHITECTURES, build_model, family, load_checkpoint, save_checkpoint

__all__ = ["ARCHITECTURES", "build_model", "family", "load_checkpoint", "save_checkpoint"]
