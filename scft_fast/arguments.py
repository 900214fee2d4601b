"""What every CLI shares: argparse `type=` validators, config dataclasses as flags, and the user-error boundary
of a main().

    parser.add_argument("--grad-accum", type=positive_int, ...)
    parser.add_argument("--rto-keep", type=fraction, ...)

    @dataclass
    class Spec:
        rto_keep: float = field(default=0.2, metadata=option("RTO positions kept (default: %(default)s)",
                                                             type=fraction))
    add_config_arguments(parser, Spec)          # --rto-keep
    spec = dataclass_from_args(Spec, args)

A validator raises argparse.ArgumentTypeError, so a bad value is argparse's own one-line `error: argument
--flag: ...` with exit status 2, before any heavy work. @cli_main(prog) turns a UserError raised later (a file, a
record, the set-up) into the same kind of line; anything else is a bug and keeps its traceback, as does every
error under --debug or SCFT_FAST_DEBUG=1.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import types
import typing

from .errors import UserError

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


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        return _number(int, text, f"an integer >= {minimum}", lambda v: v >= minimum)

    return parse


def finite_float(text: str) -> float:
    return _number(float, text, "a finite number", math.isfinite)


def positive_float(text: str) -> float:
    return _number(float, text, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def non_negative_float(text: str) -> float:
    return _number(float, text, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


def fraction(text: str) -> float:
    """(0, 1]: a share of something that must keep at least a part of it."""
    return _number(float, text, "a number in (0, 1]", lambda v: 0 < v <= 1)


def probability(text: str) -> float:
    return _number(float, text, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def decay_rate(text: str) -> float:
    """[0, 1): the factor of an exponential moving average (Adam's betas); 1 would never forget."""
    return _number(float, text, "a number in [0, 1)", lambda v: 0 <= v < 1)


def module_names(text: str) -> list[str] | str:
    """Comma-separated module names as a list, or PEFT's "all-linear" as it is."""
    text = non_empty_str(text)
    return text if text == "all-linear" else text.split(",")


def non_empty_str(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return text


def option(help: str, flag: str | None = None, **argparse_kwargs) -> dict:
    """A config field's command line, as dataclass field metadata: its flag (default: --field-name), its help and
    its add_argument settings (type=, choices=, nargs=, metavar=, action=). The help may say %(default)s, the
    flag's default. cli_default=None: the flag's default is None and the command line resolves the field from
    other flags when it is not given (a recipe's learning rate); the help's %(field_default)s is then the field's
    own default."""
    return {"help": help, "flag": flag, "argparse": argparse_kwargs}


def no_flag(reason: str) -> dict:
    """Metadata of a config field no flag sets (it is derived from other fields, or records what the run did)."""
    return {"no_flag": reason}


def _field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _fields(cls, prefix: str = ""):
    """(dotted key, field, type) of every field of a config dataclass; a nested dataclass gives its own fields
    under its name (TrainConfig's data.max_length), as the dataclass's asdict() nests them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, kind = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _fields(kind, key + ".")
            continue
        if "help" not in f.metadata and "no_flag" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has neither option() nor no_flag() metadata: every config "
                            f"field is a documented flag or says why it is none")
        yield key, f, kind


def _without_none(kind):
    """int for `int | None`; any other type as it is."""
    members = [t for t in typing.get_args(kind) if t is not type(None)]
    return members[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(members) == 1 else kind


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def config_flags(cls) -> dict[str, str]:
    """Dotted config key -> the flag that sets it, for every field of a config dataclass that has one."""
    return {key: _flag(f) for key, f, _ in _fields(cls) if "no_flag" not in f.metadata}


def add_config_arguments(parser: argparse.ArgumentParser, cls, titles: dict[str, str] | None = None) -> None:
    """One flag per field of a config dataclass (option() metadata), the fields of each nested dataclass in an
    argument group (its title from `titles`, keyed by the field's name, else the name). A flag's dest is the
    field's dotted key."""
    groups = {}
    for key, f, kind in _fields(cls):
        if "no_flag" in f.metadata:
            continue
        section = key.rpartition(".")[0]
        if section not in groups:
            groups[section] = parser.add_argument_group((titles or {}).get(section, section)) if section else parser
        kwargs = dict(f.metadata["argparse"])
        default = kwargs.pop("cli_default", _field_default(f))
        help_text = f.metadata["help"].replace("%(field_default)s", str(_field_default(f)))
        base = _without_none(kind)
        if base is bool and "action" not in kwargs:
            if default is not False:
                raise TypeError(f"{key}: a bool field defaulting to {default!r} needs an action= (a --no- flag)")
            kwargs["action"] = "store_true"
        if "action" not in kwargs:
            if "type" not in kwargs and "choices" not in kwargs and base not in (str, list[str]):
                raise TypeError(f"{key} ({kind}) needs a type= validator")
            if "choices" not in kwargs:
                kwargs.setdefault("metavar", _flag(f)[2:].upper().replace("-", "_"))
        groups[section].add_argument(_flag(f), dest=key, default=default, help=help_text, **kwargs)


def dataclass_from_args(cls, args: argparse.Namespace, prefix: str = ""):
    """The config dataclass the parsed flags of add_config_arguments(parser, cls) describe. A field whose flag
    was left at its cli_default keeps the field's default, for the caller to resolve."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key, kind = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = dataclass_from_args(kind, args, key + ".")
            continue
        if "no_flag" in f.metadata:
            continue
        value = getattr(args, key)
        unset = f.metadata["argparse"].get("cli_default", dataclasses.MISSING)
        if unset is not dataclasses.MISSING and value == unset:
            continue
        values[f.name] = tuple(value) if typing.get_origin(kind) is tuple else value
    return cls(**values)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
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
