"""The trace tables' columns, derived from engine.trace's dataclasses (their one definition).

Each trace dataclass field becomes a `TraceColumn`: its annotation gives the type (int, float,
str, a `list[...]` of them, optionally `| None`), `metadata={"codes": names}` marks a kind that
the database stores as a small integer (an index into `names`, so new kinds only append), and
its default is what a trace file written before the field existed gets on import. From the
columns come the SQLAlchemy columns (store.models), the Arrow schemas of the trace file
(store.trace_file), the pandas dtypes of the reader's DataFrames, and the row conversion of the
writer; a new field therefore needs no edit here, only a migration (store.db.MIGRATIONS).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from sqlalchemy import BigInteger, Boolean, Column, Float, Integer, SmallInteger, Text

_SCALARS = ("int", "float", "str", "bool")


@dataclass(frozen=True, slots=True)
class TraceColumn:
    name: str
    kind: str  # "int" | "float" | "str" | "bool"; "list[...]" for keyframe arrays
    nullable: bool
    codes: tuple[str, ...] | None = None  # stored as an index into these names
    has_default: bool = False
    default: Any = None  # what traces recorded before the field existed get


def trace_columns(cls: type) -> tuple[TraceColumn, ...]:
    """The columns of a trace dataclass, in field order."""
    columns = []
    for f in dataclasses.fields(cls):
        annotation = str(f.type)  # postponed annotations: always a string
        nullable = annotation.endswith("| None")
        base = annotation.removesuffix("| None").strip()
        codes = f.metadata.get("codes")
        if codes is None and base not in _SCALARS and not base.startswith("list["):
            raise TypeError(f"{cls.__name__}.{f.name}: annotation {annotation!r} has no column "
                            "type; use int, float, str or a list of them")
        has_default, default = True, f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        elif f.default is dataclasses.MISSING:
            has_default, default = False, None
        columns.append(TraceColumn(f.name, "str" if codes else base, nullable,
                                   tuple(codes) if codes else None, has_default, default))
    return tuple(columns)


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(c.name for c in trace_columns(cls))


# SQL -----------------------------------------------------------------------------------------
def sql_columns(cls: type, primary: tuple[str, ...] = ()) -> list[Column]:
    """SQLAlchemy columns of the dataclass; `primary` fields join the primary key."""
    out = []
    for c in trace_columns(cls):
        if c.kind.startswith("list["):
            raise TypeError(f"{cls.__name__}.{c.name}: list fields have no SQL column")
        if c.codes is not None:
            type_: Any = SmallInteger()
        elif c.kind == "int":
            type_ = Integer() if c.name in primary else BigInteger()
        else:
            type_ = {"float": Float(), "bool": Boolean()}.get(c.kind, Text())
        out.append(Column(c.name, type_, primary_key=c.name in primary,
                          nullable=c.nullable and c.name not in primary))
    return out


def to_sql_row(obj: Any, columns: tuple[TraceColumn, ...]) -> dict[str, Any]:
    """A trace object as a database row (kinds as their codes)."""
    row = {}
    for c in columns:
        value = getattr(obj, c.name)
        row[c.name] = c.codes.index(value) if c.codes is not None else value
    return row


def decode_codes(rows: list[tuple], columns: tuple[TraceColumn, ...]) -> list[tuple]:
    """Database rows (in column order) with kind codes turned back into names."""
    coded = [(i, c.codes) for i, c in enumerate(columns) if c.codes is not None]
    if not coded:
        return rows
    out = []
    for row in rows:
        values = list(row)
        for i, codes in coded:
            values[i] = codes[values[i]]
        out.append(tuple(values))
    return out


# pandas and Arrow ------------------------------------------------------------------------------
def pandas_dtypes(cls: type) -> dict[str, str]:
    """Reader DataFrame dtypes: nullable integers as pandas' `Int64`, kinds as names."""
    mapping = {"int": "int64", "float": "float64", "str": "object", "bool": "bool"}
    return {c.name: ("Int64" if c.kind == "int" and c.nullable else mapping.get(c.kind, "object"))
            for c in trace_columns(cls)}


def _arrow_type(kind: str) -> pa.DataType:
    if kind.startswith("list["):
        inner = kind.removeprefix("list[").removesuffix("]").removesuffix("| None").strip()
        return pa.list_(_arrow_type(inner))
    return {"int": pa.int64(), "float": pa.float64(), "str": pa.string(),
            "bool": pa.bool_()}[kind]


def arrow_schema(cls: type, exclude: tuple[str, ...] = ()) -> pa.Schema:
    """The trace file's Parquet schema of a table of `cls` rows (kinds as their names)."""
    return pa.schema([(c.name, _arrow_type(c.kind)) for c in trace_columns(cls)
                      if c.name not in exclude])
