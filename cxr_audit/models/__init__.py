from cxr_audit.models.architectures import ArchSpec, build_model, names, register, spec_of, trust_factory
from cxr_audit.models.registry import load_checkpoint, save_checkpoint

__all__ = ["ArchSpec", "build_model", "load_checkpoint", "names", "register", "save_checkpoint", "spec_of",
           "trust_factory"]
