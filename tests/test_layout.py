"""The codebase stays readable in an afternoon: no function over 60 lines in the library or the CLI."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for folder in ("cxr_audit", "cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions: " + "; ".join(long)


STAGES = {"scan": "scan", "reveal": "reveal", "annotate": "annotate", "unlearn": "unlearn", "evaluate": "evaluate",
          "gate": "gate", "stress": "stress", "training": "train"}
CROSS_CUTTING = {"__init__.py", "errors.py", "runtime.py", "configfile.py", "demo.py"}


def test_top_of_the_package_holds_only_cross_cutting_modules():
    top = {p.name for p in (ROOT / "cxr_audit").glob("*.py")}
    assert top <= CROSS_CUTTING, f"move these into their stage package: {sorted(top - CROSS_CUTTING)}"


def test_every_stage_package_exposes_its_one_entry():
    import importlib

    for package, entry in STAGES.items():
        module = importlib.import_module(f"cxr_audit.{package}")
        pipeline = importlib.import_module(f"cxr_audit.{package}.pipeline")
        assert getattr(module, entry) is getattr(pipeline, entry), package


def test_no_module_outside_store_names_a_scan_dataset_path():
    import re

    path = re.compile(r"[\"'](samples|activations|relevances|outputs|heatmaps|targets|prototypes)/|\[[\"']done[\"']\]")
    named = []
    for folder in ("cxr_audit", "cli"):
        for file in sorted((ROOT / folder).rglob("*.py")):
            if "store" not in file.relative_to(ROOT).parts:
                named += [f"{file.relative_to(ROOT)}:{i}" for i, line in enumerate(file.read_text().splitlines(), 1)
                          if path.search(line)]
    assert not named, "read and write scans through cxr_audit.store: " + ", ".join(named)
