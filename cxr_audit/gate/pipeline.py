"""``gate``: the metrics of ``evaluate`` against thresholds from a config file, for CI.

Config (TOML or YAML; relative paths are relative to the config file)::

    [gate]
    model = "model.pt"
    data = "data/manifest.csv"
    split = "test"
    artifact = "text"              # or paste_from = "annotated.csv"
    artifact_class = "disease"
    annotations = "annotations.h5" # optional: TCAV

    [gate.thresholds]              # max_<metric> / min_<metric>, any metric of `evaluate`
    max_artifact_relevance_share = 0.2
    max_artifact_inserted_drop = 0.05
    min_worst_group_accuracy = 0.8
    min_auroc.Cardiomegaly = 0.8   # multi-label models: per finding (metric.FINDING)
    max_artifact_inserted_auroc_drop.Cardiomegaly = 0.05

    [gate.annotate]                # optional: scan + annotate first, then use that CAV
    from_column = "artifact"

A threshold on a metric the run could not compute (e.g. Activation Precision without lung
masks), an unknown metric or key, or a missing file is a usage error (exit 2), never a pass.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cxr_audit.configfile import read_config_file
from cxr_audit.errors import UsageError
from cxr_audit.evaluate.pipeline import evaluate
from cxr_audit.runtime import now, versions, write_text_atomic

METRICS = ("accuracy", "auroc", "worst_group_accuracy", "test_100_h1", "test_100_h2", "test_50_50", "h1_h2_gap",
           "artifact_inserted_accuracy", "artifact_inserted_drop", "victims_inserted_accuracy",
           "artifact_relevance_share", "artifact_gradient_share", "activation_precision", "tcav_score", "tcav_sensitivity")
#: per-finding metrics of multi-label models (``min_auroc.NAME`` works for any metric above too)
FINDING_METRICS = ("artifact_inserted_auroc", "artifact_inserted_auroc_drop")
PATH_KEYS = ("model", "data", "paste_from", "annotations")
GATE_KEYS = {"model", "data", "split", "artifact", "paste_from", "artifact_class", "annotations", "sources",
             "device", "batch_size", "seed", "attribution", "thresholds", "annotate", "scan"}


@dataclass
class Check:
    metric: str
    bound: str  # "max" or "min"
    threshold: float
    value: float

    @property
    def passed(self) -> bool:
        if self.value is None or math.isnan(self.value):
            return False
        return self.value <= self.threshold if self.bound == "max" else self.value >= self.threshold


@dataclass
class GateResult:
    checks: list[Check]
    metrics: dict
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def read_gate_config(path: str | Path) -> dict:
    """Parse and validate the ``[gate]`` table; paths made absolute and checked to exist."""
    path = Path(path)
    cfg = read_config_file(path).get("gate")
    if not isinstance(cfg, dict):
        raise UsageError(f"{path} has no [gate] table")
    cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
    unknown = set(cfg) - GATE_KEYS
    if unknown:
        raise UsageError(f"{path}: unknown [gate] key(s) {sorted(unknown)} (known: {', '.join(sorted(GATE_KEYS))})")
    for key in ("model", "data"):
        if key not in cfg:
            raise UsageError(f"{path}: [gate] needs '{key}'")
    for key in PATH_KEYS:
        if cfg.get(key):
            p = Path(cfg[key])
            cfg[key] = p if p.is_absolute() else (path.parent / p).resolve()
            if not cfg[key].exists():
                raise UsageError(f"{path}: {key} = {cfg[key]} does not exist")
    for key in ("batch_size", "seed"):
        if key in cfg and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool)):
            raise UsageError(f"{path}: [gate] {key} must be an integer, got {cfg[key]!r}")
    if "sources" in cfg and (not isinstance(cfg["sources"], list) or len(cfg["sources"]) != 2):
        raise UsageError(f"{path}: [gate] sources must be a list of two source names, got {cfg['sources']!r}")
    cfg["thresholds"] = parse_thresholds(cfg.get("thresholds") or {}, path)
    return cfg


def parse_thresholds(table: dict, where: object = "config") -> list[tuple[str, str, float]]:
    """``{"max_artifact_relevance_share": 0.2}`` -> ``[("artifact_relevance_share", "max", 0.2)]``."""
    if not table:
        raise UsageError(f"{where}: [gate.thresholds] is empty; a gate without thresholds would always pass")
    out = []
    for key, value in _per_finding_keys(table):
        bound, _, metric = key.replace("-", "_").partition("_")
        if bound not in ("max", "min") or metric.split(".")[0] not in METRICS + FINDING_METRICS:
            raise UsageError(f"{where}: unknown threshold '{key}' (use max_<metric> or min_<metric>; metrics: "
                             f"{', '.join(METRICS)})")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UsageError(f"{where}: threshold '{key}' must be a number, got {value!r}")
        out.append((metric, bound, float(value)))
    return out


def _nan_to_null(obj):
    """NaN -> None throughout ``obj`` (JSON has no NaN; ``json.dumps`` would write a bare ``NaN``)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_null(v) for v in obj]
    return obj


def _per_finding_keys(table: dict):
    """``min_auroc.Cardiomegaly = 0.8`` arrives from TOML as ``{"min_auroc": {"Cardiomegaly": 0.8}}``:
    yield ``("min_auroc.Cardiomegaly", 0.8)`` (finding names keep their spelling)."""
    for key, value in table.items():
        if isinstance(value, dict):
            for finding, threshold in value.items():
                yield f"{key}.{finding}", threshold
        else:
            yield key, value


def gate(config: str | Path, out: str | Path, on_stage: Callable[[str], None] | None = None) -> GateResult:
    """Run the configured evaluation, check every threshold, write ``junit.xml``, ``gate.json``
    and ``summary.md`` to ``out``."""
    cfg = read_gate_config(config)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; gate writes a folder (junit.xml, gate.json, summary.md)")
    out.mkdir(parents=True, exist_ok=True)
    say = on_stage or (lambda _: None)
    annotations = cfg.get("annotations")
    if cfg.get("annotate") is not None:
        annotations = _scan_and_annotate(cfg, out, say)
    sources = tuple(cfg["sources"]) if cfg.get("sources") else None
    evaluation = evaluate(cfg["model"], cfg["data"], out / "evaluation", split=cfg.get("split", "test") or None,
                          artifact=cfg.get("artifact"), paste_from=cfg.get("paste_from"),
                          artifact_class_name=cfg.get("artifact_class"), annotations=annotations,
                          attribution=cfg.get("attribution", "lrp"), sources=sources,
                          device=cfg.get("device", "auto"), batch_size=int(cfg.get("batch_size", 32)),
                          seed=int(cfg.get("seed", 0)), on_stage=say)
    metrics = evaluation.metrics["model"]
    missing = [m for m, _, _ in cfg["thresholds"] if m not in metrics]
    if missing:
        raise UsageError(f"threshold(s) on {missing} but this run could not compute them (they need: "
                         "artifact/paste_from for artifact metrics, two sources for test_100/h1_h2_gap, lung masks "
                         "for activation_precision, annotations for tcav)")
    checks = [Check(m, b, t, float(metrics[m])) for m, b, t in cfg["thresholds"]]
    result = GateResult(checks, metrics)
    result.files = {"junit": _write_junit(out / "junit.xml", checks, cfg),
                    "json": out / "gate.json", "summary": out / "summary.md"}
    # strict JSON: a metric the run could not compute (NaN) is written as null
    write_text_atomic(out / "gate.json", json.dumps(_nan_to_null(
        {"passed": result.passed, "checks": [{**c.__dict__, "passed": c.passed} for c in checks],
         "metrics": metrics, "config": {k: str(v) for k, v in cfg.items()}, "created": now(),
         "versions": versions()}), indent=2, default=str, allow_nan=False))
    write_text_atomic(out / "summary.md", summary_markdown(result, cfg))
    return result


def _scan_and_annotate(cfg: dict, out: Path, say) -> Path:
    from cxr_audit.annotate.pipeline import annotate
    from cxr_audit.scan.pipeline import scan

    say("scanning for the annotation")
    scan_opts = dict(cfg.get("scan") or {})
    scan_file = scan(cfg["model"], cfg["data"], out / "scan.h5", device=cfg.get("device", "auto"), overwrite=True,
                     **scan_opts).path
    say("annotating")
    return annotate(scan_file, out / "annotations.h5", masks=False, device=cfg.get("device", "auto"),
                    **dict(cfg["annotate"])).path


def _write_junit(path: Path, checks: list[Check], cfg: dict) -> Path:
    suite = ET.Element("testsuite", name="cxr-audit gate", tests=str(len(checks)),
                       failures=str(sum(not c.passed for c in checks)), errors="0", timestamp=now())
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=f"cxr-audit.{Path(str(cfg['model'])).stem}",
                             name=f"{c.bound}_{c.metric}")
        text = f"{c.metric} = {c.value:.4f}, {c.bound} allowed {c.threshold:g}"
        if not c.passed:
            ET.SubElement(case, "failure", message=text, type="threshold").text = text
        else:
            ET.SubElement(case, "system-out").text = text
    tree = ET.ElementTree(suite)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return path


def summary_markdown(result: GateResult, cfg: dict) -> str:
    head = "✅ **cxr-audit gate passed**" if result.passed else "❌ **cxr-audit gate failed**"
    lines = [f"{head} — `{Path(str(cfg['model'])).name}` on `{Path(str(cfg['data'])).name}`", "",
             "| check | value | threshold | result |", "|---|---|---|---|"]
    for c in result.checks:
        sign = "≤" if c.bound == "max" else "≥"
        lines.append(f"| {c.metric} | {c.value:.3f} | {sign} {c.threshold:g} | {'pass' if c.passed else '**FAIL**'} |")
    others = [k for k, v in result.metrics.items() if isinstance(v, (int, float)) and k not in {c.metric for c in result.checks}]
    if others:
        lines += ["", "<details><summary>all metrics</summary>", "",
                  *[f"- {k}: {result.metrics[k]:.3f}" if isinstance(result.metrics[k], float) else f"- {k}: {result.metrics[k]}"
                    for k in others], "", "</details>"]
    return "\n".join(lines) + "\n"
