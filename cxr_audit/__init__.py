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
