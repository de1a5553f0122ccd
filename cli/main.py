"""The ``synthperf`` command: the composition root. Each subcommand lives in its own module
``cli/cmd_<name>.py`` exposing ``register(subparsers)``; nothing imports cli.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = (
    "serve",
    "echo",
    "send",
    "jobs",
    "classify",
    "process",
    "repush",
    "phantom",
    "train",
    "evaluate",
    "reference",
    "dataset",
    "users",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthperf",
        description="Synthetic Tmax perfusion maps from DWI and FLAIR. Research software: every output "
        "is SYNTHETIC and NOT FOR DIAGNOSTIC USE.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"cli.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cli.cmd_{name}":
                raise
            continue  # not built yet: the command is simply absent from --help
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
