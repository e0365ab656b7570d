"""cxr-audit: find and remove shortcut learning in chest X-ray classifiers (Reveal-to-Revise).

One package per stage, each with one public entry: ``from cxr_audit.scan import scan``, then
``reveal``, ``annotate``, ``unlearn``, ``evaluate``, ``gate``, ``stress``; ``from cxr_audit.training
import train``; ``from cxr_audit.models.importing import import_model`` (docs/architecture.md).
"""

__version__ = "0.1.0"


def stage_entry(package: str, entry: str):
    """A module ``__getattr__`` for a stage package: ``entry`` (its one public function) is
    imported from ``package.pipeline`` on first use, so importing a submodule stays light and
    free of import cycles."""

    def __getattr__(name: str):
        if name == entry:
            from importlib import import_module

            return getattr(import_module(f"{package}.pipeline"), entry)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
