"""What the subcommands share: argparse ``type=`` validators, and the user-error boundary of a main().

A validator raises argparse.ArgumentTypeError, so a bad value is argparse's own one-line `error: argument
--flag: ...` with exit status 2, before any heavy work. @cli_main(prog) turns a UserError raised later (a file, a
record, the set-up) into the same kind of line; anything else is a bug and keeps its traceback, as does every
error under --debug or SCFT_FAST_DEBUG=1.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys

from ..errors import UserError

DEBUG_ENV = "SCFT_FAST_DEBUG"


def _number(kind, text: str, expected: str, ok) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, "a positive integer", lambda v: v > 0)


def non_negative_int(text: str) -> int:
    return _number(int, text, "a non-negative integer", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(float, text, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def probability(text: str) -> float:
    return _number(float, text, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def non_empty_str(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return text


def add_debug_flag(parser: argparse.ArgumentParser, dest: str = "debug") -> None:
    parser.add_argument("--debug", dest=dest, action="store_true",
                        help=f"show the full traceback of any error (also: {DEBUG_ENV}=1)")


def debugging(argv) -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in (argv or sys.argv[1:])


def cli_main(prog: str):
    """Wraps main(argv) -> int: a UserError becomes `PROG: error: MESSAGE` on stderr and its exit status."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except UserError as e:
                if debugging(argv):
                    raise
                print(f"{prog}: error: {e}", file=sys.stderr)
                return e.exit_code

        return run

    return wrap
