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
CROSS_CUTTING = {"__init__.py", "errors.py", "runtime.py", "configfile.py", "options.py", "demo.py"}


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


#: stages in pipeline order: each may import from the ones before it and from the shared packages
STAGE_ORDER = ("training", "scan", "reveal", "annotate", "unlearn", "evaluate", "gate", "stress")
SHARED = ("data", "models", "explain", "numerics", "store", "report")


def _imported_packages(path: Path) -> set[str]:
    """The second component of every ``cxr_audit.X`` this module imports (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                 else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        found |= {n.split(".")[1] for n in names if n.startswith("cxr_audit.") and n.count(".") >= 1}
    return found


def test_imports_follow_the_pipeline_order():
    """A stage never imports a later one, and the shared packages import no stage (issue #14)."""
    against = []
    for path in sorted((ROOT / "cxr_audit").rglob("*.py")):
        parts = path.relative_to(ROOT / "cxr_audit").parts
        if len(parts) == 1:
            continue  # cross-cutting modules (demo runs every stage)
        home = parts[0]
        allowed = set(SHARED) | ({*STAGE_ORDER[:STAGE_ORDER.index(home)], home} if home in STAGE_ORDER else {home})
        wrong = _imported_packages(path) - allowed - {"errors", "runtime", "configfile", "options"}
        against += [f"{path.relative_to(ROOT)} imports cxr_audit.{w}" for w in sorted(wrong)]
    assert not against, "; ".join(against)


def test_every_package_is_installed():
    """A package missing from pyproject.toml works in the editable checkout and fails on a fresh install."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cxr_audit").rglob("__init__.py")}
    assert found - {"cxr_audit.cli"} <= listed, f"add to pyproject.toml: {sorted(found - listed)}"
