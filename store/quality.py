"""Quality evaluations in the store: every one ever made, so the Quality page can plot them."""

from __future__ import annotations

from typing import Any

import pandas as pd
from sqlalchemy import insert, select

from engine.config import RunConfig
from engine.quality_result import QualityResult
from store.db import Store, utcnow
from store.models import QualityRow
from store.trace_columns import pandas_dtypes, to_sql_row, trace_columns

QUALITY_COLUMNS = trace_columns(QualityResult)


def save_quality(store: Store, result: QualityResult, config: RunConfig) -> int:
    """Store one evaluation with the config that was evaluated; returns its id."""
    row: dict[str, Any] = {"created_at": utcnow(), "config_json": config.to_json(),
                           **to_sql_row(result, QUALITY_COLUMNS)}
    with store.write() as conn:
        return conn.execute(insert(QualityRow).values(**row).returning(QualityRow.id)
                            ).scalar_one()


def list_quality(store: Store) -> pd.DataFrame:
    """Every evaluation, oldest first: id, created_at and the QualityResult fields."""
    table = QualityRow.__table__
    names = [c.name for c in QUALITY_COLUMNS]
    query = select(table.c.id, table.c.created_at, *(table.c[n] for n in names)).order_by(
        table.c.id)
    with store.engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(query)]
    dtypes = {"id": "int64", "created_at": "datetime64[ns]", **pandas_dtypes(QualityResult)}
    return pd.DataFrame.from_records(rows, columns=list(dtypes)).astype(dtypes)
