"""What every fault scenario checks, and the results file each one adds its record to.

A scenario streams known readings (with injected anomalies) through a worker while a fault
strikes, then compares what came out with what an uninterrupted run must produce:

- every window of every sensor was scored, with the score the model gives the window's
  true readings (so no reading was lost, doubled or reordered in Redis);
- each sensor's final window in Redis holds exactly its last ``WINDOW`` readings;
- after de-duplication by event id, the alert events are those decided from the reference
  scores, in order, from a fresh state.

The record of each scenario goes to ``reliability.json`` in ``DETECTOR_RESULTS_DIR`` when
that is set (``benchmarks/suite_results.py`` sets it to ``benchmarks/results``):
``readings_reflected`` counts readings inside a correctly scored window or the verified
final window; ``duplicates_before_dedup`` counts score records and alert events received
more than once; ``recovery_s`` is the time from the fault being cleared (worker restarted,
Redis, broker or model store back) until the worker is ready and every expected output has
arrived, readings sent after the fault included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_detector import alerts
from stream_detector.devtools import loadgen
from stream_detector.windows import Window, WindowStore, due_ends
from tests.worker_support import POLICY, WINDOW, Outputs, TrainedModel

SCORE_RTOL = 1e-3


@dataclass(frozen=True)
class Reference:
    """What an uninterrupted run over a plan must publish."""

    plan: loadgen.LoadPlan
    stride: int
    scores: dict[tuple[str, int], float]  # (sensor, window end ts) -> score
    event_ids: frozenset[str]
    alert_ids: frozenset[str]

    @property
    def readings(self) -> int:
        return self.plan.sensors * self.plan.readings_per_sensor


def reference(
    plan: loadgen.LoadPlan, trained: TrainedModel, model_version: str, stride: int
) -> Reference:
    """Score every window of the plan's true readings and decide alerts from scratch."""
    scores: dict[tuple[str, int], float] = {}
    event_ids, alert_ids = set(), set()
    for index in range(plan.sensors):
        sensor_id = plan.sensor_id(index)
        ends = due_ends(sensor_id, plan.readings_per_sensor, WINDOW, stride, spread=True)
        values = loadgen.series(plan, index).astype(np.float32)
        windows = np.stack([values[end - WINDOW + 1 : end + 1] for end in ends])[:, None, :]
        with torch.inference_mode():
            result = trained.model.score(torch.from_numpy(windows))
        state = alerts.SensorAlertState(sensor_id)
        for row, end in enumerate(ends):
            ts_ms = plan.ts_ms(end)
            scores[(sensor_id, ts_ms)] = float(result.score[row])
            state, events = alerts.update(
                state,
                score=float(result.score[row]),
                ts_ms=ts_ms,
                threshold=trained.threshold,
                policy=POLICY,
                model_version=model_version,
                nearest_prototype=int(result.nearest_prototype[row]),
                attribution=(1.0,),
            )
            event_ids |= {event.event_id for event in events}
            alert_ids |= {event.alert_id for event in events}
    return Reference(plan, stride, scores, frozenset(event_ids), frozenset(alert_ids))


def verify(
    scenario: str,
    ref: Reference,
    outputs: Outputs,
    final_windows: dict[str, Window],
    recovery_s: float | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check the outputs against the reference, save the scenario's record, return it.

    ``extra`` adds scenario-specific measurements to the record.
    """
    plan = ref.plan
    first: dict[tuple[str, int], float] = {}
    for record in outputs.scores:
        first.setdefault((record["sensor_id"], record["ts_ms"]), record["score"])
    missing = sorted(set(ref.scores) - set(first))
    unexpected = sorted(set(first) - set(ref.scores))
    wrong = sorted(
        key
        for key, score in first.items()
        if key in ref.scores and not np.isclose(score, ref.scores[key], rtol=SCORE_RTOL)
    )
    events = {event["event_id"]: event for event in outputs.alerts}

    reflected = 0
    for index in range(plan.sensors):
        sensor_id = plan.sensor_id(index)
        covered = np.zeros(plan.readings_per_sensor, dtype=bool)
        for end in due_ends(sensor_id, plan.readings_per_sensor, WINDOW, ref.stride, spread=True):
            key = (sensor_id, plan.ts_ms(end))
            if key in first and key not in wrong:
                covered[end - WINDOW + 1 : end + 1] = True
        window = final_windows.get(sensor_id)
        truth = loadgen.series(plan, index)[-WINDOW:].astype(np.float32)
        if (
            window is not None
            and window.start_ts_ms == plan.ts_ms(plan.readings_per_sensor - WINDOW)
            and np.array_equal(window.values[0], truth)
        ):
            covered[-WINDOW:] = True
        reflected += int(covered.sum())

    result = {
        "scenario": scenario,
        "readings_sent": ref.readings,
        "readings_reflected": reflected,
        "windows_expected": len(ref.scores),
        "windows_scored": len(set(first) & set(ref.scores)) - len(wrong),
        "alerts_expected": len(ref.alert_ids),
        "alerts_received": len({event["alert_id"] for event in events.values()}),
        "alert_events_expected": len(ref.event_ids),
        "alert_events_received": len(events),
        "duplicates_before_dedup": (len(outputs.scores) - len(first))
        + (len(outputs.alerts) - len(events)),
        "recovery_s": None if recovery_s is None else round(recovery_s, 2),
        **(extra or {}),
    }
    save(result)
    assert not missing, f"{len(missing)} windows never scored, e.g. {missing[:3]}"
    assert not unexpected, f"windows that should not exist were scored: {unexpected[:3]}"
    assert not wrong, f"{len(wrong)} windows scored from wrong readings, e.g. {wrong[:3]}"
    assert reflected == ref.readings, result
    assert set(events) == ref.event_ids, (sorted(set(events) ^ ref.event_ids)[:5], result)
    assert ref.alert_ids, "the injected anomalies raised no alert: the check would be empty"
    return result


def final_windows(
    redis_url: str, key_prefix: str, plan: loadgen.LoadPlan, cluster: bool = False
) -> dict[str, Window]:
    windows = WindowStore(redis_url, window_length=WINDOW, key_prefix=key_prefix, cluster=cluster)
    return windows.fetch_windows(plan.sensor_id(i) for i in range(plan.sensors))


def stop_worker(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, log.read_text()[-3000:]


def results_file(name: str) -> Path | None:
    """``name`` in ``DETECTOR_RESULTS_DIR``; None when unset (tests leave the tree alone)."""
    folder = os.environ.get("DETECTOR_RESULTS_DIR")
    return None if not folder else Path(folder) / name


def save(record: dict[str, Any]) -> None:
    """Replace the scenario's record in the results file (other scenarios are kept)."""
    path = results_file("reliability.json")
    if path is None:
        return
    records = json.loads(path.read_text()) if path.exists() else []
    records = [r for r in records if r["scenario"] != record["scenario"]]
    records.append(record)
    records.sort(key=lambda r: r["scenario"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")
