"""Command line of the trainer: ``python -m trainer <command> ...`` (wiring only)."""

from __future__ import annotations

import argparse

from trainer import commands, evaluate, nab


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer", description="Train and evaluate anomaly detectors."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    nab.register(subparsers)
    evaluate.register(subparsers)
    commands.register(subparsers)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
