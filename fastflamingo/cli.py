"""The ``fastflamingo`` command line: ``info``, ``bench``, ``convert``, ``generate``, ``score``, ``evaluate``, ``finetune``, ``build-native``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from .warn import InputWarning

# subcommand -> module providing ``add_parser(subparsers)`` (which sets ``func``)
SUBCOMMANDS = {
    "info": "fastflamingo.info",
    "bench": "fastflamingo.bench.cli",
    "convert": "fastflamingo.convert.cli",
    "generate": "fastflamingo.generation.cli",
    "score": "fastflamingo.generation.score_cli",
    "evaluate": "fastflamingo.evaluation.cli",
    "finetune": "fastflamingo.training.cli",
    "build-native": "fastflamingo.native",
}


def device_arg(name: str) -> str:
    """argparse ``type`` of ``--device``: a device torch knows, and one this machine has."""
    import torch
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: torch sees no CUDA GPU on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return name


def count_arg(name: str, least: int = 0):
    """argparse ``type`` of an integer option that must be >= ``least`` (0 unless told)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < least:
            raise argparse.ArgumentTypeError(f"{name} must be >= {least}, got {n}")
        return n
    return parse


# bad paths given on the command line (a directory for a file, an output path that is a file, ...)
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def _message(e: Exception) -> str:
    """An error's one line: the OS's own errors without their "[Errno N]"."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None and str(e).startswith("[Errno"):
        return f"{e.strerror}: {str(e.filename)!r}"
    return str(e)


class _Parser(argparse.ArgumentParser):
    """A parser that takes options only as spelt: argparse's prefix matching read a typo
    (``--random-image``, ``--max-new-token``) as the option it abbreviates, without a word."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastflamingo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)  # (subcommands' parsers: the same class)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Bad input (a ``ValueError``, whose message names the value and the fix,
    or a bad path: a missing file, a directory where a file goes, an output path that is a file)
    ends with that message and exit status 2, not a traceback; set
    ``FASTFLAMINGO_TRACEBACK=1`` to see where it was raised. Warnings about the input
    (:class:`~fastflamingo.warn.InputWarning`) print the same way, as ``warning:`` lines."""
    args = build_parser().parse_args(argv)
    default_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        # warnings about the input read like the errors, without the source line they point at
        if issubclass(category, InputWarning):
            print(f"fastflamingo {args.command}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            default_show(message, category, filename, lineno, file, line)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            return int(args.func(args) or 0)
    except (ValueError, *PATH_ERRORS) as e:
        if os.environ.get("FASTFLAMINGO_TRACEBACK", "0") not in ("", "0"):
            raise
        print(f"fastflamingo {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
