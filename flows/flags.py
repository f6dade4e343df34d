"""A command's flags, declared once as a frozen dataclass beside the command's code.

Each field with help is a flag, `--field-name` (or the `flag` its metadata names), typed by its
annotation: `bool` is a switch (`--no-...` when it defaults to True), `list[str]` repeats, `int`,
`float` and `str` take a value. A field made with `positional` is an argument. The parsed command
line comes back as an instance of the dataclass, so a command reads typed values by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field


def flag(default, help: str, **argparse_kw):
    """A flag's field: its default, its help, and `flag`, `metavar`, `choices` or `required=True` (then
    the default is ignored) where the name alone won't do."""
    if argparse_kw.get("required"):
        return field(metadata={"help": help, **argparse_kw})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **argparse_kw})
    return field(default=default, metadata={"help": help, **argparse_kw})


def positional(help: str, **argparse_kw):
    """An argument's field; `default` (with nargs="?") makes it optional."""
    default = argparse_kw.pop("default", dataclasses.MISSING)
    return field(default=default, metadata={"help": help, "positional": True, **argparse_kw})


@dataclass(frozen=True, kw_only=True)
class Flags:
    """What every command gets: the global `-v`, which `modelferry` takes before the command."""

    verbose: bool = False


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Every field of `cls` that has help, as an argument of `parser` with the field's name as `dest`.
    Arguments first, then the fields `cls` declares itself, then those of its bases, nearest first."""
    hints = typing.get_type_hints(cls)
    shown = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    shown.sort(key=lambda f: (not f.metadata.get("positional"), _declared_in(cls, f.name)))
    for f in shown:
        meta = {k: v for k, v in f.metadata.items() if k not in ("positional", "flag")}
        kind = _scalar(hints[f.name])
        if f.metadata.get("positional"):
            parser.add_argument(f.name, **meta)
        elif kind is bool:
            parser.add_argument(_name(f), dest=f.name, action="store_false" if f.default else "store_true", **meta)
        elif kind is list:
            parser.add_argument(_name(f), dest=f.name, action="append", **meta)
        else:
            default = None if f.default is dataclasses.MISSING else f.default
            parser.add_argument(_name(f), dest=f.name, type=kind, default=default, **meta)


def parsed(cls: type, namespace: argparse.Namespace):
    """The instance of `cls` the parsed command line stands for (a repeatable flag never given: its default)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(namespace, f.name, None)
        if hasattr(namespace, f.name) and not (value is None and f.default_factory is not dataclasses.MISSING):
            values[f.name] = value
    return cls(**values)


def _declared_in(cls: type, name: str) -> int:
    """How far up `cls`'s bases the field `name` was last declared (0: by `cls` itself)."""
    return next(i for i, base in enumerate(cls.__mro__) if name in vars(base).get("__annotations__", {}))


def _name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _scalar(hint) -> type:
    """int for `int | None`, list for `list[str] | None`, the type itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return list
    if args:
        return _scalar(args[0])
    return hint
