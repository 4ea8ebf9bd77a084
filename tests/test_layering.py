"""The engine must stay importable without the UI and database stack (DESIGN.md layering)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_ENGINE = {"streamlit", "sqlalchemy", "altair", "store", "ui", "pages", "sweep",
                       "ray"}
FORBIDDEN_IN_STORE = {"streamlit", "altair", "ui", "pages", "sweep", "ray"}
FORBIDDEN_IN_SWEEP = {"streamlit", "altair", "ui", "pages"}


def imported_top_level_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_engine_imports_no_ui_or_database_code():
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_top_level_modules(path) & FORBIDDEN_IN_ENGINE)
        for path in (ROOT / "engine").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_store_imports_only_engine_trace_types():
    for path in (ROOT / "store").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if module and module.startswith("engine"):
                # the engine's torch-free data types: trace, config and result records
                assert module in {"engine.trace", "engine.config", "engine.run_result",
                                  "engine.quality_result"}, (
                    f"{path.name} imports {module}")
        assert not imported_top_level_modules(path) & FORBIDDEN_IN_STORE, path.name


def test_sweep_imports_no_ui_code():
    for path in (ROOT / "sweep").rglob("*.py"):
        assert not imported_top_level_modules(path) & FORBIDDEN_IN_SWEEP, path.name
