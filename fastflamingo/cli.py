"""The ``fastflamingo`` command line: ``info``, ``bench``, ``convert``, ``generate``, ``score``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> module providing ``add_parser(subparsers)`` (which sets ``func``)
SUBCOMMANDS = {
    "info": "fastflamingo.info",
    "bench": "fastflamingo.bench.cli",
    "convert": "fastflamingo.convert.cli",
    "generate": "fastflamingo.generation.cli",
    "score": "fastflamingo.generation.score_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastflamingo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Bad input (a ``ValueError`` or a missing file, whose messages name the
    value and the fix) ends with that message and exit status 2, not a traceback; set
    ``FASTFLAMINGO_TRACEBACK=1`` to see where it was raised."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("FASTFLAMINGO_TRACEBACK", "0") not in ("", "0"):
            raise
        print(f"fastflamingo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
