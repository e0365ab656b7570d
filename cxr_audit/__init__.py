"""cxr-audit: find and remove shortcut learning in chest X-ray classifiers (Reveal-to-Revise)."""

__version__ = "0.1.0"


def scan(*args, **kwargs):
    """See :func:`cxr_audit.scanning.scan` (imported lazily so ``import cxr_audit`` stays light)."""
    from cxr_audit.scanning import scan as _scan

    return _scan(*args, **kwargs)


def train(*args, **kwargs):
    """See :func:`cxr_audit.training.train`."""
    from cxr_audit.training import train as _train

    return _train(*args, **kwargs)


def import_model(*args, **kwargs):
    """See :func:`cxr_audit.models.importing.import_model`: a model trained elsewhere -> checkpoint."""
    from cxr_audit.models.importing import import_model as _import_model

    return _import_model(*args, **kwargs)
