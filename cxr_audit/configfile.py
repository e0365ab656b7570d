"""Read TOML or YAML option files (the global ``--config`` and ``gate --config``)."""

from __future__ import annotations

from pathlib import Path

import tomllib

from cxr_audit.errors import UsageError


def read_config_file(path: str | Path) -> dict:
    """The parsed file as a dict (``.yaml``/``.yml`` as YAML, anything else as TOML); a missing or
    unparsable file is a :class:`UsageError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
        else:
            data = tomllib.loads(path.read_text())
    except Exception as exc:
        raise UsageError(f"cannot parse config {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must be a table of tables, e.g. [scan]")
    return data
