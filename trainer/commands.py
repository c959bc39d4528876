"""The trainer's job and model-store commands: ``fit``, ``refresh`` and ``models``.

    python -m trainer fit --from-kafka --since 7d --store s3://models --model pumps
    python -m trainer fit --from-files a.csv b.npz --store ./models --model pumps --profile quick
    python -m trainer refresh --from-kafka --since 2d --store ./models --model pumps
    python -m trainer models list|history --store ./models --model pumps [--json]
    python -m trainer models show|promote|rollback --store ./models --model pumps [--version V]
    python -m trainer models prune --store ./models --model pumps --keep 10 [--dry-run]

``fit`` and ``refresh`` parse their options into ``trainer.jobs.JobOptions`` and run
``trainer.jobs.run`` (what a run does, and its exit codes, are described there);
``models`` lists, shows, promotes, rolls back or prunes stored versions, and shows the
model's history (promotions, rollbacks, prunes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from stream_detector import store
from stream_detector.config import Settings, mask_url
from stream_detector.model import SMOLLM2
from trainer import gate, sources, thresholds, train
from trainer.jobs import EXIT_FAILED, EXIT_LOCKED, EXIT_OK, JobError, JobOptions, run


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise JobError(f"DETECTOR_* settings are invalid: {error}") from error


def _options(args: argparse.Namespace, settings: Settings) -> JobOptions:
    if args.keep_versions < 0:
        raise JobError(f"--keep-versions must be 0 (keep all) or more, not {args.keep_versions}")
    try:
        threshold_config = thresholds.ThresholdConfig(
            risk_level=args.risk_level,
            initial_quantile=args.initial_quantile,
            min_peaks=args.min_peaks,
            max_alerts_per_day=args.max_alerts_per_day,
        )
    except ValueError as error:
        raise JobError(str(error)) from error
    return JobOptions(
        mode=args.command,
        store=args.store or settings.model.store,
        model_name=args.model or settings.model.default_model,
        from_kafka=args.from_kafka,
        since=args.since,
        files=tuple(args.from_files or ()),
        columns=tuple(args.columns) if args.columns else None,
        file_interval_ms=round(args.file_interval_s * 1000),
        incidents=args.incidents,
        profile=getattr(args, "profile", "default"),
        backbone=getattr(args, "backbone", SMOLLM2),
        backbone_layers=getattr(args, "backbone_layers", 6),
        window_length=getattr(args, "window_length", None),
        model_config=getattr(args, "model_config", None),
        threshold_config=threshold_config,
        gate_config=gate.GateConfig(
            max_false_alarm_increase=args.max_false_alarm_increase,
            max_alert_rate_increase=args.max_alert_rate_increase,
            max_missed_increase=args.max_missed_increase,
            noise_allowance=args.noise_allowance,
        ),
        max_readings_per_sensor=args.max_readings_per_sensor,
        gap_factor=args.gap_factor,
        margin_windows=args.exclusion_margin_windows,
        learn_alerts_after=args.learn_alerts_after,
        calibration_fraction=args.calibration_fraction,
        holdout_fraction=args.holdout_fraction,
        force=args.force,
        recent_only=getattr(args, "recent_only", False),
        keep_versions=args.keep_versions,
        report=args.report,
        lock_lease_s=args.lock_lease_s,
        progress=not args.quiet,
    )


def run_job_command(args: argparse.Namespace) -> int:
    """Handle ``python -m trainer fit`` and ``python -m trainer refresh``."""
    try:
        settings = _settings()
        options = _options(args, settings)
    except JobError as error:
        print(f"{args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED
    result = run(options, settings)
    summary = {
        key: result.report.get(key)
        for key in (
            "version",
            "current_version",
            "decision",
            "pruned",
            "exit_code",
            "error",
            "no_op",
        )
        if key in result.report
    }
    print(json.dumps(summary, indent=2, default=str))
    return result.exit_code


def _version_row(root: str, model_name: str, version: str, current: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"version": version, "current": version == current}
    try:
        config = store.version_metadata(root, model_name, version)
    except store.ModelStoreError as error:
        return {**row, "complete": False, "error": str(error)}
    training = config.get("training", {})
    report_bytes = store.read_version_file(root, model_name, version, store.REPORT_FILE)
    report = json.loads(report_bytes) if report_bytes else {}
    holdout = config.get("metrics", {}).get("holdout", {})
    return {
        **row,
        "complete": True,
        "mode": training.get("mode"),
        "parent_version": training.get("parent_version"),
        "trained_at": training.get("trained_at"),
        "gate_passed": report.get("decision", {}).get("passed"),
        "false_alarm_rate": holdout.get("false_alarm_rate"),
        "window_length": config.get("model", {}).get("window_length"),
        "channels": config.get("model", {}).get("channels"),
    }


def run_models_command(args: argparse.Namespace) -> int:
    """Handle ``python -m trainer models list|show|promote|rollback|prune|history``."""
    console = Console()
    try:
        settings = _settings()
        root = args.store or settings.model.store
        model_name = args.model or settings.model.default_model
        if args.action == "list":
            return _list(console, root, model_name, args.json)
        if args.action == "history":
            return _history(root, model_name, args.json)
        if args.action == "show":
            version = args.version or store.current_version(root, model_name)
            if version is None:
                raise JobError(f"{model_name} has no CURRENT version; name one with --version")
            shown = _show(root, model_name, version)
            print(json.dumps(shown, indent=2, default=str))
            return EXIT_OK
        if args.action == "promote":
            if not args.version:
                raise JobError("models promote needs --version")
            store.promote(root, model_name, args.version, reason=args.reason or "operator")
            console.print(f"{model_name}: CURRENT is now {args.version}")
            return EXIT_OK
        if args.action == "prune":
            pruned = store.prune_versions(root, model_name, args.keep, dry_run=args.dry_run)
            verb = "would delete" if args.dry_run else "deleted"
            console.print(f"{model_name}: {verb} {len(pruned)} versions: {' '.join(pruned) or '-'}")
            return EXIT_OK
        target = store.rollback(root, model_name, reason=args.reason or "operator rollback")
        console.print(f"{model_name}: rolled back; CURRENT is now {target}")
        return EXIT_OK
    except store.StoreLockedError as error:
        print(f"models {args.action}: {error}", file=sys.stderr)
        return EXIT_LOCKED
    except (JobError, store.ModelStoreError, OSError) as error:
        print(f"models {args.action}: {error}", file=sys.stderr)
        return EXIT_FAILED


def _history(root: str, model_name: str, as_json: bool) -> int:
    entries = store.history(root, model_name)
    if as_json:
        print(json.dumps({"model": model_name, "store": mask_url(root), "history": entries}))
        return EXIT_OK
    # One line an entry, oldest first, as ``git log --oneline`` reads (version names are
    # too long for a table's columns).
    for entry in entries:
        if entry.get("action") == "prune":
            versions = "deleted " + " ".join(entry.get("versions", []))
        else:
            versions = f"{entry.get('from') or '-'} -> {entry.get('to')}"
        reason = f": {entry['reason']}" if entry.get("reason") else ""
        actor = entry.get("actor")
        print(f"{entry.get('ts')}  {entry.get('action')}  {versions}  by {actor}{reason}")
    return EXIT_OK


def _list(console: Console, root: str, model_name: str, as_json: bool) -> int:
    current = store.current_version(root, model_name)
    rows = [
        _version_row(root, model_name, v, current) for v in store.list_versions(root, model_name)
    ]
    if as_json:
        listing = {
            "model": model_name,
            "store": mask_url(root),
            "current": current,
            "versions": rows,
        }
        print(json.dumps(listing, indent=2))
        return EXIT_OK
    table = Table(title=f"{model_name} in {mask_url(root)}")
    table.add_column("")
    table.add_column("version", no_wrap=True)  # operators copy it into promote --version
    for column in ("mode", "gate", "false alarms", "L"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        gate_text = {True: "passed", False: "refused", None: "-"}[row.get("gate_passed")]
        table.add_row(
            "*" if row["current"] else "",
            row["version"],
            str(row.get("mode") or ("incomplete" if not row["complete"] else "-")),
            gate_text,
            "-" if row.get("false_alarm_rate") is None else f"{row['false_alarm_rate']:.4f}",
            str(row.get("window_length") or "-"),
        )
    console.print(table)
    return EXIT_OK


def _show(root: str, model_name: str, version: str) -> dict[str, Any]:
    config = store.version_metadata(root, model_name, version)
    config.get("model", {}).pop("backbone_config", None)  # long, and not for people
    thresholds_bytes = store.read_version_file(root, model_name, version, "thresholds.json")
    report_bytes = store.read_version_file(root, model_name, version, store.REPORT_FILE)
    return {
        "model": model_name,
        "version": version,
        "current": store.current_version(root, model_name) == version,
        "config": config,
        "thresholds": (
            thresholds.summary(json.loads(thresholds_bytes)) if thresholds_bytes else None
        ),
        "report": json.loads(report_bytes) if report_bytes else None,
        "history": [
            entry
            for entry in store.history(root, model_name)
            if version in (entry.get("from"), entry.get("to"))
        ],
    }


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", help="model store: a directory or a URL (default: DETECTOR_MODEL__STORE)"
    )
    parser.add_argument("--model", help="model name (default: DETECTOR_MODEL__DEFAULT_MODEL)")


def _job_arguments(parser: argparse.ArgumentParser) -> None:
    _store_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-kafka",
        action="store_true",
        help="replay the readings topic (DETECTOR_KAFKA__* settings, as the worker)",
    )
    source.add_argument(
        "--from-files", nargs="+", type=Path, metavar="PATH", help=".csv, NAB, UCR or .npz files"
    )
    parser.add_argument(
        "--since", default="7d", help="with --from-kafka: 7d, 12h, 2w or an ISO time (default 7d)"
    )
    parser.add_argument("--columns", nargs="+", help="CSV value columns (default: all others)")
    parser.add_argument(
        "--file-interval-s",
        type=float,
        default=60.0,
        help="sampling interval assumed for files without timestamps (default 60)",
    )
    parser.add_argument(
        "--incidents", type=Path, help="JSON list of [sensor, start, end] labelled incidents"
    )
    parser.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    parser.add_argument("--report", type=Path, help="also write the run's JSON report here")
    parser.add_argument("--risk-level", type=float, default=1e-3, help="q per window (1e-3)")
    parser.add_argument("--initial-quantile", type=float, default=0.98, help="POT u (0.98)")
    parser.add_argument("--min-peaks", type=int, default=30, help="else quantile (30)")
    parser.add_argument(
        "--max-alerts-per-day", type=float, help="alert budget per sensor (default: none)"
    )
    parser.add_argument("--max-false-alarm-increase", type=float, default=0.002)
    parser.add_argument("--max-alert-rate-increase", type=float, default=0.5)
    parser.add_argument("--max-missed-increase", type=int, default=0)
    parser.add_argument(
        "--noise-allowance", type=float, default=2.0, help="gate slack, in standard errors"
    )
    parser.add_argument(
        "--max-readings-per-sensor",
        type=int,
        default=sources.DEFAULT_MAX_READINGS_PER_SENSOR,
        help="memory cap; the oldest readings beyond it are dropped",
    )
    parser.add_argument("--gap-factor", type=float, default=sources.DEFAULT_GAP_FACTOR)
    parser.add_argument("--exclusion-margin-windows", type=float, default=1.0)
    parser.add_argument(
        "--learn-alerts-after",
        default="never",
        help="with --from-kafka: train on an alert's readings once it has been open this long "
        "(1d, 12h), a change of regime rather than an anomaly; or never (default never)",
    )
    parser.add_argument("--calibration-fraction", type=float, default=0.25)
    parser.add_argument("--holdout-fraction", type=float, default=0.15)
    parser.add_argument("--lock-lease-s", type=float, default=store.DEFAULT_LEASE_S)
    parser.add_argument(
        "--keep-versions",
        type=int,
        default=JobOptions.keep_versions,
        help="after storing: keep CURRENT, this many newest versions and as many rollback "
        f"targets; delete the rest (default {JobOptions.keep_versions}; 0 keeps all)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(handler=run_job_command)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fit``, ``refresh`` and ``models`` to the trainer's command line."""
    fit = subparsers.add_parser(
        "fit",
        help="train a new model version, calibrate, gate and promote it",
        description="Full retrain from the stream or files; see trainer/jobs.py.",
    )
    _job_arguments(fit)
    fit.add_argument("--profile", choices=sorted(train.PROFILES), default="default")
    fit.add_argument("--backbone", default=SMOLLM2, help="Hugging Face name or directory")
    fit.add_argument("--backbone-layers", type=int, default=6, help="K blocks kept (6)")
    fit.add_argument(
        "--window-length", type=int, help="readings per window (default: DETECTOR_WINDOW_LENGTH)"
    )
    fit.add_argument(
        "--model-config",
        type=Path,
        help="JSON of ModelConfig fields; a backbone_config in it means a random backbone",
    )
    refresh = subparsers.add_parser(
        "refresh",
        help="re-fit CURRENT's prototypes and thresholds on recent data",
        description="Cheap update: k-means prototypes + threshold recalibration.",
    )
    _job_arguments(refresh)
    refresh.add_argument(
        "--recent-only",
        action="store_true",
        help="keep CURRENT's prototypes and thresholds; only its recent windows, which let "
        "the memory term learn recurring shapes, are new (a cheap, frequent CronJob)",
    )

    models = subparsers.add_parser(
        "models", help="list, show, promote, roll back or prune versions, or show the history"
    )
    models.add_argument(
        "action", choices=["list", "show", "promote", "rollback", "prune", "history"]
    )
    _store_arguments(models)
    models.add_argument("--version", help="for show (default CURRENT) and promote")
    models.add_argument("--reason", help="recorded in the promotion history")
    models.add_argument(
        "--json", action="store_true", help="list, history: machine-readable output"
    )
    models.add_argument(
        "--keep",
        type=int,
        default=JobOptions.keep_versions,
        help="prune: keep CURRENT, this many newest versions and as many rollback targets "
        f"(default {JobOptions.keep_versions})",
    )
    models.add_argument("--dry-run", action="store_true", help="prune: only list what would go")
    models.set_defaults(handler=run_models_command)
