"""Typed method options and string choices, checked in one place.

Every registered method (attribution methods in :mod:`cxr_audit.explain.methods`, CAV estimators
in :mod:`cxr_audit.numerics.cav`, mitigations in :mod:`cxr_audit.unlearn`) declares the options it
takes once, as ``option_types = {"name": type}``; the CLI passes them as repeatable
``--option KEY=VALUE`` (``--cav-option`` for the CAV), and :func:`typed_options` converts them and
refuses unknown keys with a one-line error naming the valid ones. :func:`choice` does the same for
string choices (``--balance``, ``--embedding``, ...).
"""

from __future__ import annotations

from typing import Iterable

from cxr_audit.errors import UsageError


def choice(what: str, value: str, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``; otherwise ``unknown WHAT 'value' (choose from: ...)``."""
    allowed = list(allowed)
    if value not in allowed:
        raise UsageError(f"unknown {what} '{value}' (choose from: {', '.join(allowed)})")
    return value


def parse_pairs(pairs: Iterable[str] | None, flag: str = "--option") -> dict[str, str]:
    """``["C=0.1", "per_position=false"]`` -> ``{"C": "0.1", "per_position": "false"}``; the
    method converts and checks the values (:func:`typed_options`)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} must be KEY=VALUE, got '{pair}'")
        out[key.strip()] = value.strip()
    return out


def typed_options(owner: str, declared: dict[str, type], given: dict, *, listed: Iterable[str] | None = None,
                  flag: str = "--option") -> dict:
    """``given`` with every value converted to its declared type.

    ``owner`` names the method in errors (``"--method rrclarc"``); ``listed`` are the keys the
    error offers (default: every declared one). Values that are already typed pass unchanged.
    """
    unknown = sorted(set(given) - set(declared))
    if unknown:
        offered = list(declared if listed is None else listed)
        raise UsageError(f"{owner} has no option {', '.join(unknown)}"
                         + (f" (options: {', '.join(offered)})" if offered else " (it takes none)"))
    return {key: _convert(key, value, declared[key], flag) for key, value in given.items()}


def _convert(key: str, value, kind: type, flag: str):
    """``value`` (a string from the CLI, or already typed) as ``kind``; one-line error otherwise."""
    if not isinstance(value, str) or kind is str:
        return value
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return kind(value)
    except ValueError:
        raise UsageError(f"{flag} {key}={value}: expected {kind.__name__}") from None
