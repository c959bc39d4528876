"""The model store: versions, CURRENT, history, rollback and the lock, locally and in memory://."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import torch

from stream_detector import store
from stream_detector.checkpoint import CheckpointError, sha256_file
from stream_detector.devtools.tiny import tiny_model
from stream_detector.model import AnomalyLLM
from stream_detector.scorer import ModelRegistry
from stream_detector.store.backends import open_backend
from stream_detector.store.lock import LockInfo

pytestmark = pytest.mark.unit

THRESHOLDS = {"default": {"threshold": 2.0, "method": "quantile"}}


@pytest.fixture(scope="module")
def model() -> AnomalyLLM:
    return tiny_model().eval()


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    if request.param == "local":
        return tmp_path / "models"
    return f"memory://stores-{uuid.uuid4().hex}"


def test_publish_promote_and_rollback_follow_the_history(
    root: Path | str, model: AnomalyLLM
) -> None:
    first = store.publish_version(root, "pumps", model, thresholds=THRESHOLDS)
    second = store.publish_version(root, "pumps", model, promote=False)
    assert store.list_versions(root, "pumps") == [first, second]
    assert store.current_version(root, "pumps") == first

    store.promote(root, "pumps", second, reason="retrained", actor="ops")
    third = store.publish_version(root, "pumps", model, reason="nightly")
    assert store.current_version(root, "pumps") == third

    assert store.rollback(root, "pumps") == second
    assert store.rollback(root, "pumps", reason="still bad") == first
    with pytest.raises(store.ModelStoreError, match="no earlier CURRENT"):
        store.rollback(root, "pumps")
    assert store.current_version(root, "pumps") == first

    entries = store.history(root, "pumps")
    assert [(e["action"], e["from"], e["to"]) for e in entries] == [
        ("promote", None, first),
        ("promote", first, second),
        ("promote", second, third),
        ("rollback", third, second),
        ("rollback", second, first),
    ]
    assert entries[1]["actor"] == "ops" and entries[1]["reason"] == "retrained"
    assert entries[4]["reason"] == "still bad"
    assert all(e["ts"].endswith("+00:00") for e in entries)


def test_pruning_keeps_current_the_newest_and_the_rollback_targets(
    root: Path | str, model: AnomalyLLM
) -> None:
    first = store.publish_version(root, "pumps", model)
    second = store.publish_version(root, "pumps", model)
    refused = store.publish_version(root, "pumps", model, promote=False)
    fourth = store.publish_version(root, "pumps", model)
    current = store.publish_version(root, "pumps", model)
    newest = store.publish_version(root, "pumps", model, promote=False)
    everything = [first, second, refused, fourth, current, newest]
    assert store.list_versions(root, "pumps") == everything
    assert store.rollback_targets(store.history(root, "pumps")) == [fourth, second, first]

    # Kept: CURRENT, the two newest and the two versions two rollbacks return to.
    assert store.prune_versions(root, "pumps", 2, dry_run=True) == [first, refused]
    assert store.list_versions(root, "pumps") == everything
    assert store.prune_versions(root, "pumps", 2) == [first, refused]
    assert store.list_versions(root, "pumps") == [second, fourth, current, newest]
    assert store.prune_versions(root, "pumps", 2) == []
    # The history records the deletion once: not the dry run, not the prune with nothing to do.
    prunes = [entry for entry in store.history(root, "pumps") if entry["action"] == "prune"]
    assert [entry["versions"] for entry in prunes] == [[first, refused]]
    assert prunes[0]["actor"] and "2 each" in prunes[0]["reason"]

    assert store.rollback(root, "pumps") == fourth
    assert store.rollback(root, "pumps") == second
    assert store.load_version(root, "pumps", second).version == second
    with pytest.raises(store.ModelStoreError, match="no published version"):
        store.rollback(root, "pumps")  # to the first, which was pruned
    with pytest.raises(store.ModelStoreError, match="at least 1 version"):
        store.prune_versions(root, "pumps", 0)
    with (
        store.StoreLock(root, "pumps", owner="job-a"),
        pytest.raises(store.StoreLockedError, match="job-a"),
    ):
        store.prune_versions(root, "pumps", 1)
    assert store.list_versions(root, "pumps") == [second, fourth, current, newest]


def test_a_version_loads_with_its_thresholds_and_extra_files(
    root: Path | str, model: AnomalyLLM
) -> None:
    version = store.publish_version(
        root, "pumps", model, thresholds=THRESHOLDS, extra_files={"report.json": b'{"a": 1}'}
    )
    assert store.current_version(root, "pumps") == version
    checkpoint = store.load_version(root, "pumps", version)
    x = torch.randn(3, 1, 32)
    assert torch.equal(checkpoint.model.score(x).score, model.score(x).score)
    assert checkpoint.thresholds == THRESHOLDS
    assert checkpoint.version == version
    assert store.read_version_file(root, "pumps", version, "report.json") == b'{"a": 1}'
    assert store.version_metadata(root, "pumps", version)["model_name"] == "pumps"


def test_unknown_versions_and_bad_names_are_refused(root: Path | str, model: AnomalyLLM) -> None:
    with pytest.raises(store.ModelStoreError, match="no published version"):
        store.promote(root, "pumps", "nope")
    with pytest.raises(store.ModelStoreError, match="must be 1-128 characters"):
        store.publish_version(root, "../etc", model)
    assert store.current_version(root, "pumps") is None


def test_a_second_writer_fails_clearly_while_the_lock_is_held(
    root: Path | str, model: AnomalyLLM
) -> None:
    version = store.publish_version(root, "pumps", model, promote=False)
    with store.StoreLock(root, "pumps", owner="job-a", purpose="fit") as lock:
        with pytest.raises(store.StoreLockedError, match=r"locked by job-a \(fit\)"):
            store.StoreLock(root, "pumps", owner="job-b").acquire()
        with pytest.raises(store.StoreLockedError, match="job-a"):
            store.promote(root, "pumps", version)
        store.promote(root, "pumps", version, lock=lock)
    assert store.current_version(root, "pumps") == version
    # Released: anyone may write again, and another model was never blocked.
    store.StoreLock(root, "pumps").acquire().release()


def test_an_expired_lock_is_taken_over_and_its_holder_stops_writing(
    root: Path | str, model: AnomalyLLM
) -> None:
    version = store.publish_version(root, "pumps", model, promote=False)
    stale = store.StoreLock(root, "pumps", owner="crashed-job", lease_s=3600).acquire()
    # The holder dies without releasing; its lease runs out.
    stale._stop.set()
    backend = open_backend(root)
    info = LockInfo("crashed-job", stale.token, 0, int(time.time() * 1000) - 1)
    backend.write_atomic("pumps/LOCK", info.to_bytes())

    with store.StoreLock(root, "pumps", owner="next-job") as taker:
        assert taker.holder().owner == "next-job"
        with pytest.raises(store.LockLostError, match="held by next-job"):
            store.promote(root, "pumps", version, lock=stale)
        assert store.current_version(root, "pumps") is None


def test_the_lease_is_renewed_while_the_holder_runs(root: Path | str) -> None:
    with store.StoreLock(root, "pumps", lease_s=0.3) as lock:
        first = lock.holder().expires_ms
        time.sleep(0.5)
        assert lock.holder().expires_ms > first
        with pytest.raises(store.StoreLockedError):
            store.StoreLock(root, "pumps").acquire()


def test_an_unfinished_upload_is_never_promoted(model: AnomalyLLM) -> None:
    root = f"memory://stores-{uuid.uuid4().hex}"
    version = store.publish_version(root, "pumps", model, promote=False)
    backend = open_backend(root)
    backend.delete(f"pumps/versions/{version}/config.json")  # as if the upload stopped
    with pytest.raises(store.ModelStoreError, match="no published version"):
        store.promote(root, "pumps", version)
    with pytest.raises(store.ModelStoreError, match="no complete version"):
        store.version_metadata(root, "pumps", version)


def _tamper_hash(directory: Path) -> None:
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def _truncate(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    config = json.loads((directory / "config.json").read_text())
    # Even with a matching hash, a truncated file must not load.
    config["weights_sha256"] = sha256_file(weights)
    (directory / "config.json").write_text(json.dumps(config))


def _drop_config(directory: Path) -> None:
    (directory / "config.json").unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_tamper_hash, "sha256"),
        (_truncate, "does not match its config"),
        (_drop_config, "config.json is missing"),
    ],
)
def test_damaged_versions_are_refused_and_the_registry_keeps_serving(
    tmp_path: Path, model: AnomalyLLM, damage: object, message: str
) -> None:
    root = tmp_path / "models"
    good = store.publish_version(root, "pumps", model, thresholds=THRESHOLDS)
    registry = ModelRegistry(
        root, ["pumps"], device=torch.device("cpu"), window_length=32, poll_interval_s=0.0
    )
    registry.refresh(force=True)
    assert registry.loaded == {"pumps": good}

    bad = store.publish_version(root, "pumps", model, thresholds=THRESHOLDS, promote=False)
    damage(store.version_dir(root, "pumps", bad))  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=message):
        store.load_version(root, "pumps", bad)
    if damage is not _drop_config:
        store.promote(root, "pumps", bad)
        (event,) = registry.refresh(force=True)
        assert event.version == bad and message in (event.error or "")
        assert registry.loaded == {"pumps": good}
    else:
        with pytest.raises(store.ModelStoreError, match="no published version"):
            store.promote(root, "pumps", bad)
