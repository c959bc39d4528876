"""Command line: ``python -m stream_detector run|config|state|alerts|alertmanager|loadgen|demo``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

from stream_detector.config import Settings


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        sys.exit(f"invalid DETECTOR_* configuration:\n{error}")


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (the second SIGINT interrupts as usual)."""
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def _run(args: argparse.Namespace) -> int:
    from stream_detector import logs, worker

    settings = _settings()
    logs.configure(settings)
    return worker.run(settings, _stop_on_signals())


def _config(args: argparse.Namespace) -> int:
    print(json.dumps(_settings().masked_dump(), indent=2))
    return 0


def _state(args: argparse.Namespace) -> int:
    """What the workers hold in Redis for some sensors: one JSON line per sensor."""
    from stream_detector.windows import WindowStore

    store = WindowStore.from_settings(_settings(), args.channels)
    windows = store.fetch_windows(args.sensor)
    states = store.get_alert_state(args.sensor)
    for sensor_id in args.sensor:
        window = windows.get(sensor_id)
        held = None
        if window is not None:
            held = {
                "start_ts_ms": window.start_ts_ms,
                "end_ts_ms": window.end_ts_ms,
                "values": window.values.tolist(),  # per channel, oldest reading first
            }
        line = {"sensor_id": sensor_id, "window": held, "alert_state": states.get(sensor_id)}
        print(json.dumps(line, allow_nan=False), flush=True)
    return 0


def _alerts(args: argparse.Namespace) -> int:
    from stream_detector import subscriber

    settings = _settings()
    bands = settings.alerts.severity_bands
    if args.min_severity is not None and args.min_severity not in bands:
        sys.exit(f"--min-severity must be one of {', '.join(bands)}")
    subscriber.run(
        settings,
        alert_filter=subscriber.AlertFilter(args.sensor, args.min_severity),
        from_beginning=args.from_beginning,
        as_json=args.json,
        stop=_stop_on_signals(),
        timeout_s=args.timeout,
        max_events=args.max_events,
    )
    return 0


def _alertmanager(args: argparse.Namespace) -> int:
    from stream_detector import alertmanager, logs

    settings = _settings()
    logs.configure(settings)
    url = args.url or settings.alertmanager.url
    if not url:
        sys.exit("no Alertmanager address: pass --url or set DETECTOR_ALERTMANAGER__URL")
    return alertmanager.run(settings, _stop_on_signals(), url=url)


def _loadgen(args: argparse.Namespace) -> int:
    from stream_detector.devtools import loadgen

    settings = _settings()
    load = loadgen.plan(
        args.sensors, args.rate, args.duration, anomalies=args.anomalies, seed=args.seed
    )
    description = json.dumps(loadgen.describe(load), indent=2)
    if args.anomalies_out:
        args.anomalies_out.write_text(description + "\n")
    print(description, flush=True)
    sent = loadgen.produce(
        load,
        settings.kafka.bootstrap_servers,
        args.topic or settings.kafka.topics.readings,
        pace=not args.no_pace,
        stop=_stop_on_signals(),
        config=settings.kafka.extra,
    )
    print(json.dumps({"sent": sent}), flush=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from stream_detector.devtools import demo

    return demo.run(
        out=args.out,
        speed=args.speed,
        series=args.series,
        backbone=args.backbone,
        profile=args.profile,
        stop=_stop_on_signals(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stream_detector",
        description="Streaming anomaly detection for sensor fleets.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("run", help="the streaming worker, configured by DETECTOR_* variables")
    commands.add_parser("config", help="print the effective configuration (secrets masked)")

    state = commands.add_parser(
        "state", help="a sensor's current window and alert state in Redis, as JSON lines"
    )
    state.add_argument("sensor", nargs="+", help="sensor ids")
    state.add_argument("--channels", type=int, default=1, help="the sensors' channel count")

    alerts = commands.add_parser("alerts", help="tail the alerts topic, one line per change")
    alerts.add_argument("--sensor", default="*", help="sensor id glob (default: all)")
    alerts.add_argument("--min-severity", help="lowest severity shown, e.g. major")
    alerts.add_argument("--from-beginning", action="store_true", help="replay the whole topic")
    alerts.add_argument("--json", action="store_true", help="JSON lines instead of text")
    alerts.add_argument("--timeout", type=float, help="stop after this many seconds")
    alerts.add_argument("--max-events", type=int, help="stop after this many events")

    bridge = commands.add_parser(
        "alertmanager", help="forward anomaly alerts to Alertmanager (its v2 API)"
    )
    bridge.add_argument("--url", help="Alertmanager's address (DETECTOR_ALERTMANAGER__URL)")

    load = commands.add_parser("loadgen", help="synthetic readings with injected anomalies")
    load.add_argument("--sensors", type=int, default=100)
    load.add_argument("--rate", type=float, default=1.0, help="readings/s per sensor")
    load.add_argument("--duration", type=float, default=60.0, help="seconds of readings")
    load.add_argument("--anomalies", type=int, default=3, help="sensors given a level shift")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--topic", help="default: the configured readings topic")
    load.add_argument("--no-pace", action="store_true", help="produce as fast as possible")
    load.add_argument("--anomalies-out", type=Path, help="also write the plan as JSON here")

    demo = commands.add_parser("demo", help="the whole pipeline on one machine, on NAB data")
    demo.add_argument("--out", type=Path, default=Path("demo-out"))
    demo.add_argument("--speed", type=float, default=100.0, help="readings/s replayed")
    demo.add_argument("--series", type=Path, help="another NAB-style CSV (timestamp,value)")
    demo.add_argument("--backbone", default="smollm2", help="smollm2, or a local HF model dir")
    demo.add_argument("--profile", default="quick", help="training profile (quick, default)")

    args = parser.parse_args(argv)
    handlers = {
        "run": _run,
        "config": _config,
        "state": _state,
        "alerts": _alerts,
        "alertmanager": _alertmanager,
        "loadgen": _loadgen,
        "demo": _demo,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
