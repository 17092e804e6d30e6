"""Command lines generated from the stages' option dataclasses.

Each stage's options are one frozen dataclass, validated on construction;
its fields carry their flag's help in ``metadata`` (see :func:`option`). One
``fields()`` walk builds the argparse options, so the flag, its default, its
choices and its help come from one definition, and library callers build the
same object the command line builds (:func:`from_args`). Standard library
only: every layer uses it, the torch-free client included.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Literal

_KEY = "patchserve_cli"


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           aliases: tuple[str, ...] = (), metavar: str | None = None, choices: tuple | None = None,
           parse: Callable[[str], Any] | None = None, positional: bool = False, repeat: bool = False,
           default_text: str | None = None, cli: bool = True, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is also a command-line option.

    ``flag`` overrides the ``--kebab-name`` derived from the field name;
    ``aliases`` adds short or old spellings; ``parse`` turns the text into the
    field's value (argparse reports its ``ArgumentTypeError`` with the flag);
    ``repeat`` collects a repeated flag into a tuple; ``positional`` makes it
    an argument (one value, or ``nargs='+'`` for a tuple); ``default_text``
    says what a ``None`` default means; ``cli=False`` keeps it off the
    command line.
    """
    meta = {_KEY: {"help": help, "flag": flag, "aliases": tuple(aliases), "metavar": metavar, "choices": choices,
                   "parse": parse, "positional": positional, "repeat": repeat, "default_text": default_text,
                   "cli": cli}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(cls: type, name: str) -> str:
    """The command-line spelling of one field, for error messages."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            meta = f.metadata.get(_KEY, {})
            if meta.get("positional"):
                return meta.get("metavar") or name.upper()
            return meta.get("flag") or "--" + name.replace("_", "-")
    raise KeyError(name)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _tuple_parser(flag: str, item: type, count: int | None) -> Callable[[str], tuple]:
    what = {int: "integers", float: "numbers", str: "values"}.get(item, "values")

    def parse(text: str) -> tuple:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = tuple(item(p) for p in parts)
        except ValueError:
            values = None
        if values is None or not values or (count is not None and len(values) != count):
            n = f"{count} " if count is not None else ""
            raise argparse.ArgumentTypeError(f"{flag}: expected {n}comma-separated {what}, got {text!r}")
        return values
    return parse


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value else "none"
    return str(value)


def _help(meta: dict, default: Any, choices: tuple | None, required: bool) -> str:
    text = meta["help"].rstrip(".")
    if choices:
        text += ("; " if text else "") + "one of " + ", ".join(str(c) for c in choices)
    if required or meta["positional"]:
        return text
    # default_text says what an empty default means ("every model folder", "the server's max").
    empty = default is None or default == ()
    shown = meta["default_text"] if empty and meta["default_text"] else ("none" if default is None else _show(default))
    # argparse formats help with %-style; a literal % must be doubled.
    return (f"{text} (default: {shown})" if text else f"default: {shown}").replace("%", "%%")


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                exclude: tuple[str, ...] = (), title: str | None = None) -> None:
    """Add one option per field of ``cls``; a field that is itself an option dataclass adds a group."""
    hints = typing.get_type_hints(cls)
    root = parser if isinstance(parser, argparse.ArgumentParser) else None
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_KEY)
        if f.name in exclude or (meta is not None and not meta["cli"]):
            continue
        tp, _optional = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            group = (root or parser).add_argument_group(
                (meta or {}).get("help") or tp.__doc__.strip().splitlines()[0]) if root else parser
            add_options(group, tp)
            continue
        if meta is None:
            raise TypeError(f"{cls.__name__}.{f.name}: give it option(...) or option(cli=False)")
        _add_one(parser, f, tp, meta)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _add_one(parser, f: dataclasses.Field, tp: Any, meta: dict) -> None:
    default = _default(f)
    required = default is dataclasses.MISSING
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    choices = meta["choices"]
    if typing.get_origin(tp) is Literal:
        choices = choices or typing.get_args(tp)
        tp = type(typing.get_args(tp)[0])
    kw: dict[str, Any] = {}
    if meta["metavar"]:
        kw["metavar"] = meta["metavar"]
    # Choices are listed in the help; the dataclass validates them, so a wrong
    # value gets the same typed error from the command line and from a library call.
    if meta["positional"]:
        if typing.get_origin(tp) is tuple:
            kw["nargs"] = "+"
            kw["type"] = meta["parse"] or typing.get_args(tp)[0]
        else:
            kw["type"] = meta["parse"] or tp
        kw["help"] = _help(meta, default, choices, True)
        parser.add_argument(f.name, **kw)
        return
    names = (flag, *meta["aliases"])
    kw["dest"] = f.name
    kw["help"] = _help(meta, None if required else default, choices, required)
    if required:
        kw["required"] = True
    if tp is bool:
        parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=default, **kw)
        return
    if meta["repeat"]:
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp
        kw.pop("required", None)
        parser.add_argument(*names, action="append", type=meta["parse"] or item, default=None,
                            required=required, **kw)
        return
    if meta["parse"]:
        kw["type"] = meta["parse"]
    elif typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        count = None if (len(args) == 2 and args[1] is Ellipsis) else len(args)
        kw["type"] = _tuple_parser(flag, args[0], count)
    else:
        kw["type"] = tp
    parser.add_argument(*names, default=None if required else default, **kw)


def from_args(cls: type, args: argparse.Namespace, **override: Any) -> Any:
    """The options object the parsed command line describes (nested option dataclasses included)."""
    hints = typing.get_type_hints(cls)
    given = vars(args)
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in override:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            kw[f.name] = from_args(tp, args)
        elif f.name in given:
            value = given[f.name]
            if isinstance(value, list):
                value = tuple(value)
            if value is None and _default(f) not in (None, dataclasses.MISSING):
                continue  # a repeatable flag that was never given keeps the field's default
            kw[f.name] = value
    kw.update(override)
    return cls(**kw)
