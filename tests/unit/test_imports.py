"""Which module may import what: each external system has its modules, and the worker
package never builds on the trainer. Imports are read from the source (function-level ones
included), so a lazy import cannot slip past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.shared_data import REPO_ROOT

pytestmark = pytest.mark.unit

PACKAGE = REPO_ROOT / "stream_detector"
# Top-level import name -> the modules of stream_detector allowed to import it.
ALLOWED = {
    "confluent_kafka": {
        "consumer",  # the only Consumer
        "publisher",  # the only Producer
        "devtools.services",  # creates the embedded broker's topics
    },
    "redis": {"windows", "devtools.services"},  # devtools: the embedded Redis's PING
    "transformers": {"model"},
    # The worker package never builds on the trainer (the demo runs `python -m trainer fit`).
    "trainer": set(),
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (dotted names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_external_systems_and_the_trainer_are_imported_only_where_allowed() -> None:
    found: dict[str, set[str]] = {name: set() for name in ALLOWED}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in {module.split(".")[0] for module in imports_of(path)} & set(ALLOWED):
            found[name].add(_module_name(path))
    assert found == ALLOWED


def test_nothing_the_worker_runs_imports_the_devtools() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "__main__.py":
            continue  # it dispatches `demo` and `loadgen` to them, lazily
        devtools = {m for m in imports_of(path) if m.startswith("stream_detector.devtools")}
        assert devtools == set(), f"{path.name} imports {devtools}"


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from trainer.train import fit\n    import redis.asyncio\n")
    assert imports_of(module) == {"trainer.train", "redis.asyncio"}
