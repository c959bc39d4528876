"""Nothing the worker or the trainer loads can run code: no pickle, anywhere.

A model store is written by the trainer and read by every worker, so whoever can write to
it must not gain code execution in the workers. Checkpoints are safetensors plus JSON
(stream_detector/checkpoint.py). Tampered and truncated weights are refused by
tests/unit/test_checkpoint.py; here: no code path can unpickle, and pickles planted in a
version directory are never executed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from stream_detector import store
from stream_detector.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError
from stream_detector.devtools.tiny import tiny_model

pytestmark = pytest.mark.unit

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("stream_detector", "trainer")
# Modules whose loading functions unpickle (marshal and shelve included: same risk).
UNPICKLING_MODULES = frozenset(
    {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _unpickling_call(call: ast.Call) -> str | None:
    """Why ``call`` may unpickle, or None."""
    if not isinstance(call.func, ast.Attribute):
        return None
    owner, name = ast.unparse(call.func.value), call.func.attr
    keywords = {keyword.arg: keyword.value for keyword in call.keywords}
    if owner == "torch" and name == "load" and not _is_true(keywords.get("weights_only")):
        return "torch.load without weights_only=True"
    if owner in {"np", "numpy"} and name == "load" and _is_true(keywords.get("allow_pickle")):
        return "numpy.load with allow_pickle=True"
    if name in {"read_pickle", "load_pickle"}:
        return f"{owner}.{name}"
    return None


def unpickling_sites(source: str) -> list[str]:
    """Lines of ``source`` that import an unpickling module or may unpickle through a loader."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            modules = []
        found += [
            f"{node.lineno}: imports {module}"
            for module in modules
            if module.split(".")[0] in UNPICKLING_MODULES
        ]
        if isinstance(node, ast.Call) and (why := _unpickling_call(node)):
            found.append(f"{node.lineno}: {why}")
    return found


def test_the_scanner_finds_every_kind_of_unpickling() -> None:
    source = "\n".join(
        [
            "import pickle",
            "from joblib import load",
            "import dill.settings",
            "torch.load(path)",
            "torch.load(path, weights_only=False)",
            "np.load(path, allow_pickle=True)",
            "pandas.read_pickle(path)",
            "torch.load(path, weights_only=True)",
            "np.load(path, allow_pickle=False)",
            "json.load(stream)",
        ]
    )
    assert [site.split(":")[0] for site in unpickling_sites(source)] == [
        "1", "2", "3", "4", "5", "6", "7",
    ]  # fmt: skip


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_can_unpickle(package: str) -> None:
    modules = sorted((PROJECT_ROOT / package).rglob("*.py"))
    assert modules, f"no modules found under {package}/"
    found = {
        str(module.relative_to(PROJECT_ROOT)): sites
        for module in modules
        if (sites := unpickling_sites(module.read_text(encoding="utf-8")))
    }
    assert found == {}


class _Planted:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, Path]:
    """A model store with one published version: (store root, version directory)."""
    root = tmp_path / "models"
    version = store.publish_version(root, "default", tiny_model())
    return root, store.version_dir(root, "default", version)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pkl", "thresholds.pkl"])
def test_a_pickle_planted_beside_the_weights_is_never_opened(
    published: tuple[Path, Path], tmp_path: Path, name: str
) -> None:
    root, directory = published
    marker = tmp_path / "executed"
    (directory / name).write_bytes(pickle.dumps(_Planted(marker)))

    checkpoint = store.load_version(root, "default", directory.name)

    assert checkpoint.model is not None
    assert not marker.exists(), f"{name} was unpickled"


def test_weights_replaced_by_a_torch_pickle_are_refused_even_with_a_matching_sha256(
    published: tuple[Path, Path], tmp_path: Path
) -> None:
    root, directory = published
    marker = tmp_path / "executed"
    weights = directory / WEIGHTS_FILE
    torch.save({"payload": _Planted(marker)}, weights)
    # Someone who can write the store can also rewrite the recorded digest.
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (directory / CONFIG_FILE).write_text(json.dumps(config))

    with pytest.raises(CheckpointError, match="does not match its config"):
        store.load_version(root, "default", directory.name)
    assert not marker.exists(), "the weights file was unpickled"
