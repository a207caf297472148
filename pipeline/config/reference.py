"""The settings reference, ``docs/settings.md``, generated from the campaign schema.

Every key a campaign file may hold is a field of
:class:`palflow.pipeline.config.settings.Campaign` or of one of its sections, and its
meaning is the field's attribute docstring. This module walks the schema and writes
one Markdown table per TOML table: the key as written in the TOML (dotted), its type
and bounds, its default, its unit where the name or the docstring says it, and its
meaning::

    python -m palflow.pipeline.config.reference           # print the reference
    python -m palflow.pipeline.config.reference --write   # rewrite docs/settings.md

``tests/test_docs.py`` checks that ``docs/settings.md`` is what this module writes.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import sys
import textwrap
import types
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from palflow.apps.models import registry
from palflow.apps.models.backend import BackendSettings
from palflow.pipeline.config.sections import NAME_PATTERN
from palflow.pipeline.config.settings import Campaign

REFERENCE_FILE = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
"""``docs/settings.md`` of the checkout this module belongs to."""

COMMAND = "python -m palflow.pipeline.config.reference --write"
"""The command that regenerates :data:`REFERENCE_FILE`."""

UNITS: dict[str, str] = {
    "training.huber_delta": "eV/atom, eV/Å",
    "model.e0s": "eV (a table)",
}
"""Units the name and the docstring do not spell out where the rules below find them."""

_NAME_UNITS = (
    ("_meV_per_atom_ps", "meV/atom/ps"),
    ("_per_bar", "1/bar"),
    ("_bar", "bar"),
    ("_fs", "fs"),
    ("_ps", "ps"),
    ("_s", "s"),
    ("_K", "K"),
)
"""Name endings that say the unit (the first match wins)."""

_UNIT = r"(Å|eV/Å|eV/atom|eV|K|s|fs|ps|bar|1/bar|1/fs|GPa|meV/atom|eV/Å³)"
_DOC_UNITS = (
    # "Vacuum (Å) added ...", "Forces above this (eV/Å) ...": a unit in parentheses
    # among the first words, where it qualifies the setting itself.
    re.compile(rf"^(?:[\w`'\-]+\s+){{0,6}}\({_UNIT}\)"),
    # "Neighbour cutoff, Å.", "The barostat's relaxation time, fs."
    re.compile(rf"^[^.(]*, {_UNIT}(?:[.;:]|\s\(|$)"),
)

SECTION_NOTES: dict[str, str] = {
    "": "Keys written at the top of the file, before the first table.",
    "system": "The system the potential must cover. Several systems: one `[[systems]]` "
    "table each, with the same keys, instead of `[system]` "
    "([Several systems](concepts.md#several-systems)).",
    "oracle": "The expensive calculator that labels structures. `calculator` takes "
    "`module:Class`, `path/to/file.py:Class` or a factory function that returns an ASE "
    "calculator; it must import on the workers "
    "([Oracle calculators](plugins.md#oracle-calculators)).",
    "model": "The committee's model. `name` picks the backend, and each backend has its "
    "own keys: a key of another backend is an error ([The models](concepts.md#the-models)).",
    "training": "How each member trains and what it publishes "
    "([Training](concepts.md#training-what-a-version-publishes)).",
    "generator": "What proposes candidates: MD on the committee by default "
    "([Generators](concepts.md#generators)).",
    "selection": "Which candidates are worth a label "
    "([Selection strategies](concepts.md#selection-strategies)).",
    "metrology": "Extra metrics per ensemble version.",
    "initial": "The labels before the first training, and warm starts "
    "([Warm starts](concepts.md#warm-starts)).",
    "test": "The held-out set the test errors are measured on.",
    "stop": "When the campaign stops ([Is it done](concepts.md#is-it-done-and-can-i-use-it)).",
    "validate": "The MD check of the exported potential (`palflow validate`), and whether "
    "a campaign runs it as its final stage.",
}
"""A line under each table's heading, by section name."""


@dataclass(frozen=True)
class Row:
    """One setting of the reference."""

    name: str
    type: str
    default: str
    unit: str
    meaning: str


@dataclass(frozen=True)
class Table:
    """One TOML table of the reference: its heading, a note and its settings."""

    key: str
    title: str
    note: str
    rows: tuple[Row, ...]


# ------------------------------------------------------------------------ the schema
def tables() -> list[Table]:
    """Every table of the campaign schema, in the order of the ``Campaign`` class."""
    top: list[Row] = []
    found: list[Table] = []
    fields = Campaign.model_fields
    lists = {key: _list_item(field.annotation) for key, field in fields.items()}
    singles = {field.annotation for field in fields.values()}
    for key, field in fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BackendSettings):
            for name, path in registry.BUILTIN.items():
                cls = registry.backend(name).settings
                title = f'`[{key}]` with `name = "{name}"`'
                table = _table(key, title, cls, backend=path)
                if name != registry.DEFAULT:  # this table only with the name written out
                    rows = [_given(r) if r.name == f"{key}.name" else r for r in table.rows]
                    table = Table(table.key, table.title, table.note, tuple(rows))
                found.append(table)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            # [system] and [[systems]] share one class: one table for both.
            title = f"`[{key}]`" + "".join(
                f" and `[[{other}]]`" for other, item in lists.items() if item is annotation
            )
            found.append(_table(key, title, annotation))
        elif lists[key] is not None:
            if lists[key] not in singles:  # a list of tables with no single one of its kind
                found.append(_table(key, f"`[[{key}]]`", lists[key]))
        else:
            top.append(_row("", key, field, Campaign))
    found.insert(0, Table("", "Top level", SECTION_NOTES[""], tuple(top)))
    return found


def _list_item(annotation: Any) -> type | None:
    """The model class of a ``list[Model]`` annotation, else None."""
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
    return None


def _table(key: str, title: str, cls: type[BaseModel], backend: str = "") -> Table:
    note = SECTION_NOTES.get(key) or _first_paragraph(cls.__doc__)
    if backend:
        note = f"{note} This backend is `{backend}`."
    rows = tuple(_row(key, name, field, cls) for name, field in cls.model_fields.items())
    return Table(key, title, note, rows)


def _row(section: str, name: str, field: FieldInfo, cls: type) -> Row:
    dotted = f"{section}.{name}" if section else name
    doc = field_docstring(cls, name)
    kind, default = type_text(field.annotation, field.metadata), default_text(field)
    return Row(dotted, kind, default, unit_of(dotted, doc), _markdown(doc))


def _given(row: Row) -> Row:
    return Row(row.name, row.type, "required", row.unit, row.meaning)


def field_docstring(cls: type, name: str) -> str:
    """The attribute docstring of field ``name``: the string right below its
    annotation in the class body of ``cls`` or, failing that, of its bases."""
    docs = (_class_docstrings(klass).get(name) for klass in cls.__mro__)
    return next((doc for doc in docs if doc), "")


@cache
def _class_docstrings(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # built-in or without a source file
        return {}
    (node,) = ast.parse(source).body
    found = {}
    body = node.body if isinstance(node, ast.ClassDef) else []
    for statement, following in zip(body, body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            found[statement.target.id] = inspect.cleandoc(following.value.value)
    return found


# ------------------------------------------------------------------------ the cells
_BOUNDS = {Ge: ("≥", "ge"), Gt: (">", "gt"), Le: ("≤", "le"), Lt: ("<", "lt")}


def type_text(annotation: Any, metadata: list[Any] | None = None) -> str:
    """The type as a TOML user reads it, with its bounds (``int, ≥ 1``)."""
    text = _type_name(annotation)
    bounds = []
    for item in metadata or []:
        if type(item) in _BOUNDS:
            sign, attribute = _BOUNDS[type(item)]
            bounds.append(f"{sign} {_number(getattr(item, attribute))}")
        elif isinstance(item, MinLen):
            bounds.append("not empty" if item.min_length == 1 else f"length ≥ {item.min_length}")
        elif isinstance(item, MaxLen):
            bounds.append(f"length ≤ {item.max_length}")
        elif getattr(item, "pattern", None):
            bounds.append(_pattern_text(item.pattern))
    return ", ".join([text, *bounds])


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return "any"
    if annotation is type(None):
        return "unset"
    if origin is Literal:
        return " or ".join(f"`{json.dumps(value)}`" for value in args)
    if origin in (Union, types.UnionType):
        given = [_type_name(arg) for arg in args if arg is not type(None)]
        text = " or ".join(given)
        return f"{text}, optional" if type(None) in args else text
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "table" if args[1] is Any else f"table of {_type_name(args[1])}"
    names = {bool: "bool", int: "int", float: "float", str: "string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _pattern_text(pattern: str) -> str:
    if pattern == NAME_PATTERN:
        return "a plain name: letters, digits, `_.-`"
    return f"matching `{pattern}`"


def _number(value: Any) -> str:
    return "2**32" if value == 2**32 else str(value)  # the seed's bound


def default_text(field: FieldInfo) -> str:
    """The default as it would be written in TOML; ``unset`` for None."""
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    return f"`{toml_value(value)}`" if value is not None else "unset"


def toml_value(value: Any) -> str:
    """``value`` written as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict) and value:
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)  # an empty table: {}


def unit_of(dotted: str, doc: str) -> str:
    """The unit of a setting: :data:`UNITS`, then its name's ending, then its
    docstring's first sentence (see :data:`_DOC_UNITS`); blank where none says it."""
    if dotted in UNITS:
        return UNITS[dotted]
    name = dotted.rpartition(".")[2]
    for ending, unit in _NAME_UNITS:
        if name.endswith(ending):
            return unit
    first = " ".join(doc.split())
    first = first.replace("``", "")
    for pattern in _DOC_UNITS:
        match = pattern.search(first)
        if match:
            return match.group(1)
    return ""


_ROLES = re.compile(r":(?:class|func|mod|meth|data|attr):`~?([^`]+)`")


def _markdown(doc: str) -> str:
    """A docstring as one Markdown line: ``code`` to `code`, Sphinx roles to code."""
    text = " ".join(doc.split())
    text = _ROLES.sub(r"`\1`", text)
    text = text.replace("``", "`")
    return text.replace("|", "\\|")


def _first_paragraph(doc: str | None) -> str:
    return _markdown(inspect.cleandoc(doc).split("\n\n")[0]) if doc else ""


# ------------------------------------------------------------------------ the page
def render() -> str:
    """``docs/settings.md``: every setting of the campaign schema, one table per section."""
    found = tables()
    lines = [
        "# Settings reference",
        "",
        f"Generated from the campaign schema by `{COMMAND}`: do not edit it by hand.",
        "",
        "A campaign file is TOML. A setting's dotted name is its table and its key:",
        "`stop.max_labels` is written",
        "",
        "```toml",
        "[stop]",
        "max_labels = 500",
        "```",
        "",
        "Every table rejects a key it does not know and a value of the wrong type, naming",
        "the key; no number may be `inf` or `nan`. A setting left out takes its default;",
        "the defaults together are the default campaign (ethanol labelled by GFN2-xTB),",
        "whose main settings `examples/ethanol_xtb.toml` writes out. Types: `string`,",
        "`int`, `float` and `bool` are TOML's; a *table* is an inline table",
        "`{ key = value }`; an *optional* setting is unset unless given. The unit column",
        "is filled where the setting's name or description gives one. How the campaign",
        "uses the settings: [concepts.md](concepts.md).",
        "",
        "Contents:",
        "",
    ]
    seen: dict[str, int] = {}
    for table in found:
        lines.append(f"- [{table.title}](#{_anchor(table.title, seen)})")
    for table in found:
        lines += ["", f"## {table.title}", ""]
        if table.note:
            lines += [table.note, ""]
        lines += ["| name | type | default | unit | meaning |", "|---|---|---|---|---|"]
        for row in table.rows:
            cells = (f"`{row.name}`", row.type, row.default, row.unit, row.meaning)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _anchor(title: str, seen: dict[str, int]) -> str:
    """The anchor GitHub gives heading ``title`` (a repeated one gets ``-1``, ``-2``...)."""
    slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    return slug if count == 0 else f"{slug}-{count}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m palflow.pipeline.config.reference",
        description="The settings reference (docs/settings.md), from the campaign schema.",
    )
    parser.add_argument(
        "--write", action="store_true", help=f"rewrite {REFERENCE_FILE.name} instead of printing"
    )
    args = parser.parse_args(argv)
    text = render()
    if not args.write:
        sys.stdout.write(text)
        return 0
    if not REFERENCE_FILE.parent.is_dir():
        print(
            f"no docs/ folder beside this copy of palflow ({REFERENCE_FILE.parent}): run it "
            "from a checkout installed with `pip install -e .`",
            file=sys.stderr,
        )
        return 2
    REFERENCE_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {REFERENCE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
