"""Command-line flags derived from the config dataclasses (litgpt style): a field's type, default and help are
declared once, on the field, and become one flag here.

``max_seq_len: int = 2048`` with a docstring under it becomes ``--max-seq-len MAX_SEQ_LEN``, its help the docstring
plus "(default: 2048)". In the parsed namespace every such flag defaults to None, so ``config_from_args`` passes on
only what was given and each default lives in its dataclass alone. ``bool`` fields become switches (``--x`` for a
False default, ``--no-x`` for a True one), ``tuple`` fields comma-separated lists, ``dict`` fields no flag at all.
Floats must be finite: ``nan`` and ``inf`` are refused for every flag.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import MISSING, fields
from functools import cache


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, ``error: ...`` on stderr, and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {tidy(message)} (see {self.prog} --help)\n")


def tidy(message: str) -> str:
    """argparse's ``argument --x/--y: must be ...`` as ``--x must be ...``, on one line."""
    message = " ".join(message.split())
    m = re.fullmatch(r"argument ([^/:\s]+)(?:/\S+)?: (must .*)", message)
    return f"{m.group(1)} {m.group(2)}" if m else message


# -- value parsers: a ValueError-free conversion or an ArgumentTypeError naming what was expected --------------------


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


SCALARS = {int: integer, float: finite_float, str: str}
NOUNS = {int: "integers such as 1,4,16", float: "numbers", str: "names"}


def comma_list(item: type):
    """``"a,b"`` -> ``(a, b)`` of ``item``s: the flag of a ``tuple[item, ...]`` field."""
    convert = SCALARS[item]

    def parse(text: str) -> tuple:
        try:
            return tuple(convert(s.strip()) for s in text.split(",") if s.strip())
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be comma-separated {NOUNS[item]}, got {text!r}") from None

    return parse


# -- reading a dataclass -------------------------------------------------------------------------------------------


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field (the litgpt convention), from the source of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue  # object, or a class without source
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                text = " ".join(inspect.cleandoc(nxt.value.value).replace("``", "").split())  # help is plain text
                docs[node.target.id] = re.sub(r"^--[\w-]+: ", "", text)  # an older "--flag: help" spelling
    return docs


def _flag_type(hint) -> tuple[str, typing.Callable | None]:
    """("bool" | "scalar" | "list" | "none", value parser) for a field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]  # X | None
    if hint is bool:
        return "bool", None
    if hint in SCALARS:
        return "scalar", SCALARS[hint]
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] in SCALARS:
        return "list", comma_list(typing.get_args(hint)[0])
    return "none", None  # dicts and other structures are not flags


def _show(default) -> str:
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


# -- flags ---------------------------------------------------------------------------------------------------------


def add_field_arg(
    parser,
    cls: type,
    name: str,
    aliases: tuple[str, ...] = (),
    choices=None,
    help: str | None = None,
) -> None:
    """One flag for the field ``name`` of dataclass ``cls`` (see the module docstring). A flag already declared by
    hand in ``parser`` wins: that one is kept and this call adds nothing."""
    field = next(f for f in fields(cls) if f.name == name)
    kind, convert = _flag_type(typing.get_type_hints(cls)[name])
    if kind == "none":
        return
    default = None if field.default is MISSING else field.default
    doc = (help or field_docs(cls).get(name, "")).replace("%", "%%")  # argparse %-formats help strings
    flag = "--" + name.replace("_", "-")
    if kind == "bool" and default is True:
        flag, doc = "--no-" + name.replace("_", "-"), f"turn off (on by default): {doc[:1].lower()}{doc[1:]}"
    if any(s in parser._option_string_actions for s in (flag, *aliases)):
        return
    if kind == "bool":
        action = "store_false" if default is True else "store_true"
        parser.add_argument(flag, *aliases, dest=name, action=action, default=None, help=doc)
        return
    if default not in (None, ()):
        doc += f" (default: {_show(default)})"
    parser.add_argument(flag, *aliases, dest=name, type=convert, choices=choices, default=None, help=doc)


def add_config_args(
    parser,
    cls: type,
    only: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    aliases: dict[str, tuple[str, ...]] | None = None,
    choices: dict[str, tuple] | None = None,
    helps: dict[str, str] | None = None,
) -> None:
    """One flag per field of ``cls`` (or of the fields in ``only``), in field order, except ``exclude``."""
    names = only if only is not None else [f.name for f in fields(cls) if f.init]
    for name in names:
        if name not in exclude:
            add_field_arg(
                parser, cls, name, (aliases or {}).get(name, ()), (choices or {}).get(name), (helps or {}).get(name)
            )


def config_from_args(cls: type, args: argparse.Namespace, **overrides):
    """``cls`` from the flags that were given (None = not given: the dataclass default holds), plus ``overrides``."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if f.init and getattr(args, f.name, None) is not None}
    return cls(**{**given, **overrides})
