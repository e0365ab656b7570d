"""cxr-audit: find and remove shortcut learning in chest X-ray classifiers (Reveal-to-Revise).

One package per stage, each with one public entry: ``from cxr_audit.scan import scan``, then
``reveal``, ``annotate``, ``unlearn``, ``evaluate``, ``gate``, ``stress``; ``from cxr_audit.training
import train``; ``from cxr_audit.models.importing import import_model`` (docs/architecture.md).
"""

__version__ = "0.1.0"
