"""Cost of ``refresh`` versus ``fit`` on the same data, through the real job code.

Three runs per case, each a full job (read, update the model, calibrate, gate, publish):
``fit_first`` on an empty store; then, against that CURRENT, ``fit`` (a steady-state
retrain: it also loads and judges CURRENT) and ``refresh``. Reported per run: wall
seconds per phase and in total; ratios: whole job, and the model update alone
(training vs k-means).

    python benchmarks/refresh_vs_fit.py --backbone tiny
    python benchmarks/refresh_vs_fit.py --backbone smollm2 \\
        --nab-file /work/shared/data/nab/data/artificialWithAnomaly/art_daily_jumpsup.csv

Results are merged by case name into benchmarks/results/refresh_vs_fit.json.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from stream_detector.config import AlertPolicy, Settings
from stream_detector.devtools import loadgen
from stream_detector.devtools.tiny import tiny_model_config_json
from stream_detector.model import SMOLLM2
from trainer import jobs, thresholds

RESULTS = Path(__file__).parent / "results" / "refresh_vs_fit.json"
MINUTE_MS = 60_000


def synthetic_csv(path: Path) -> Path:
    """Three sensors, three days at one reading a minute, one noise burst."""
    start = 1_700_000_000_000
    anomaly = loadgen.InjectedAnomaly(
        "s-00001", start + 2000 * MINUTE_MS, start + 2040 * MINUTE_MS, 1.5
    )
    plan = loadgen.LoadPlan(3, 1 / 60, 3 * 24 * 60, start, (anomaly,), seed=1, sensor_prefix="s")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ts", "sensor_id", "value"])
        for index in range(plan.sensors):
            values = loadgen.series(plan, index)
            for step in range(plan.readings_per_sensor):
                writer.writerow([plan.ts_ms(step), plan.sensor_id(index), f"{values[step]:.6f}"])
    return path


def run_case(
    name: str, data: Path, settings: Settings, base: jobs.JobOptions, workdir: Path
) -> dict[str, Any]:
    workdir.mkdir(parents=True)
    root = workdir / "models"
    runs: dict[str, Any] = {}

    def timed(label: str, options: jobs.JobOptions) -> None:
        started = time.perf_counter()
        result = jobs.run(options, settings)
        seconds = time.perf_counter() - started
        report = result.report
        if result.exit_code not in (jobs.EXIT_OK, jobs.EXIT_REFUSED):
            raise RuntimeError(f"{label} failed: {report.get('error')}")
        runs[label] = {
            "seconds": round(seconds, 2),
            "phases_s": report["timings_s"],
            "exit_code": result.exit_code,
            "windows": report["data"]["windows"],
            "decision": report["decision"]["reasons"],
        }
        print(f"{name} {label}: {seconds:.1f} s {report['timings_s']}", flush=True)

    first = dataclasses.replace(base, store=str(root), files=(data,))
    timed("fit_first", first)
    for label in ("fit", "refresh"):
        copy = workdir / f"models-{label}"
        shutil.copytree(root, copy)
        options = dataclasses.replace(first, mode=label, store=str(copy))
        if label == "fit":
            # Another (equivalent) risk level: not a rerun of fit_first, the same work.
            risk = base.threshold_config.risk_level * 1.0001
            options = dataclasses.replace(
                options,
                threshold_config=dataclasses.replace(base.threshold_config, risk_level=risk),
            )
        timed(label, options)
    return {"case": name, "runs": runs}


def fastest(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Per run label, the repeat with the lowest total; ratios recomputed from those."""
    runs = {
        label: min((r["runs"][label] for r in repeats), key=lambda run: run["seconds"])
        for label in repeats[0]["runs"]
    }
    fit, refresh = runs["fit"], runs["refresh"]
    return {
        "case": repeats[0]["case"],
        "repeats": len(repeats),
        "runs": runs,
        "all_seconds": {label: [r["runs"][label]["seconds"] for r in repeats] for label in runs},
        "ratio_whole_job": round(fit["seconds"] / refresh["seconds"], 2),
        "ratio_model_update": round(
            fit["phases_s"]["train"] / max(refresh["phases_s"]["train"], 1e-3), 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--nab-file", type=Path, help="NAB csv (labels are found beside it)")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, multi-threaded kernels wait "
        "for descheduled threads and timings swing tenfold)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="keep each run's fastest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    policy = AlertPolicy(confirm_k=2, confirm_n=3, min_duration_windows=2, cooldown_ms=0)
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        if args.backbone == "tiny":
            window_length, stride = 32, 4
            model_config = workdir / "tiny.json"
            model_config.write_text(json.dumps(tiny_model_config_json()))
        else:
            window_length, stride, model_config = 128, 16, None
        data = args.nab_file or synthetic_csv(workdir / "synthetic.csv")
        settings = Settings(window_length=window_length, stride=stride, device="cpu", alerts=policy)
        base = jobs.JobOptions(
            mode="fit",
            store="",
            model_name="bench",
            profile=args.profile,
            backbone=SMOLLM2,
            model_config=model_config,
            threshold_config=thresholds.ThresholdConfig(),
            progress=False,
        )
        name = f"{args.backbone}-{args.profile}-{data.stem}"
        repeats = [
            run_case(name, data, settings, base, workdir / f"repeat-{i}")
            for i in range(args.repeats)
        ]
        result = fastest(repeats)
    result["machine"] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    result["data"] = str(data) if args.nab_file else "synthetic: 3 sensors x 3 days at 1/min"
    existing = json.loads(args.out.read_text()) if args.out.is_file() else {"cases": []}
    cases = [c for c in existing["cases"] if c["case"] != result["case"]] + [result]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cases": cases}, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("case", "ratio_whole_job", "ratio_model_update")}))


if __name__ == "__main__":
    main()
