"""The ``fastflamingo`` command line: ``info``, ``bench``, ``convert``, ``generate``."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module providing ``add_parser(subparsers)`` (which sets ``func``)
SUBCOMMANDS = {
    "info": "fastflamingo.info",
    "bench": "fastflamingo.bench.cli",
    "convert": "fastflamingo.convert.cli",
    "generate": "fastflamingo.generation.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastflamingo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
