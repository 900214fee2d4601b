"""`scft-fast SUBCOMMAND ...`: each subcommand is a module with main(argv) -> int; adding one is one line."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": "scft_fast.cli.train",
    "generate": "scft_fast.cli.generate",
    "eval": "scft_fast.cli.evaluate",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        names = ", ".join(SUBCOMMANDS)
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: scft-fast {{{names}}} ...\n\n'scft-fast SUBCOMMAND --help' documents each subcommand.")
            return 0
        print(f"usage: scft-fast {{{names}}} ...\nunknown or missing subcommand {argv[0] if argv else ''!r}",
              file=sys.stderr)
        return 2
    return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
