"""HTML reports rendered from the Jinja2 templates in ``report/templates/`` with autoescape on:
every value a template prints — labels, paths, sources, layer names — is HTML-escaped by
construction; markup lives only in the templates."""

from __future__ import annotations

from functools import lru_cache

import jinja2


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("cxr_audit.report", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context) -> str:
    """The template ``template`` (a file name in ``report/templates/``) rendered with ``context``."""
    return _environment().get_template(template).render(nan=float("nan"), **context)
