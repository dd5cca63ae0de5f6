"""`klgrade` entry point. Each sub-command lives in klgrade/commands/<name>.py and exposes
``register(subparsers)``; this module discovers them, so adding a command touches no other file."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

import klgrade
import klgrade.commands
from klgrade.errors import USER_ERRORS, UserError  # noqa: F401 - UserError's old home


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klgrade",
        description="Kellgren-Lawrence grading of knee radiographs: task-specific CNNs vs foundation-model embeddings.",
    )
    parser.add_argument("--version", action="version", version=f"klgrade {klgrade.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(klgrade.commands.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        importlib.import_module(f"klgrade.commands.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("KLGRADE_TRACEBACK"):
            raise
        print(f"klgrade {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
