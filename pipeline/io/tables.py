"""Object tables as Parquet and CSV files (pyarrow): one row per object, written whole.

Both files are written atomically (:func:`fs.atomic_file`): a reader sees a whole table or
none. Columns are NumPy arrays of equal length, written in the order given.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from . import fs


def write_table(
    columns: Mapping[str, np.ndarray],
    parquet: str | None,
    csv: str | None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``columns`` to ``parquet`` and/or ``csv`` (``metadata``: Parquet key/values)."""
    table = pa.table({name: pa.array(values) for name, values in columns.items()})
    if metadata:
        table = table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})
    if parquet is not None:
        with fs.storage_errors("instances.path", parquet, "write"), fs.atomic_file(parquet) as tmp:
            pq.write_table(table, tmp, compression="zstd")
    if csv is not None:
        with fs.storage_errors("instances.path", csv, "write"), fs.atomic_file(csv) as tmp:
            pa_csv.write_csv(table, tmp)


def read_table(path: str) -> dict[str, np.ndarray]:
    """A Parquet table written by :func:`write_table`, as NumPy columns."""
    with fs.open_read(path) as handle:
        table = pq.read_table(handle)
    return {name: table.column(name).to_numpy() for name in table.column_names}
