"""Reading CSV/Parquet tables whole or in chunks, with errors that name the file."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
CHUNK_ROWS = 200_000


def stem(path: Path) -> str:
    """File name without its table suffix (``n001.csv.gz`` -> ``n001``)."""
    name = path.name
    for suf in TABLE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def is_table(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(TABLE_SUFFIXES)


def is_parquet(path: Path) -> bool:
    return path.name.lower().endswith((".parquet", ".pq"))


def columns(path: Path) -> list[str]:
    """A table's column names without reading its rows (CSV header line, Parquet schema)."""
    if is_parquet(path):
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:
            raise InputError(f"{path}: cannot read the Parquet schema: {exc}") from exc
    return check_header(path)


def check_header(path: Path) -> list[str]:
    """A CSV's header; refuse one that names a column twice (pandas would rename the copy ``name.1``
    and ingest it as another metric)."""
    import csv
    import gzip
    from collections import Counter

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read the header line: {exc}") from exc
    dup = [name for name, n in Counter(header).items() if n > 1]
    if dup:
        raise InputError(f"{path}: the header names column(s) {dup[:10]} more than once; each metric needs "
                         f"one column")
    return header


def read_table(path: Path) -> pd.DataFrame:
    import pandas as pd

    if not is_parquet(path):
        check_header(path)
    try:
        return pd.read_parquet(path) if is_parquet(path) else pd.read_csv(path)
    except Exception as exc:  # pandas/pyarrow raise many types; name the file either way
        raise InputError(f"{path}: cannot read table: {exc}") from exc


def iter_table_chunks(path: Path, rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    import pandas as pd

    try:
        if is_parquet(path):
            import pyarrow.parquet as pq

            f = pq.ParquetFile(path)
            for group in range(f.metadata.num_row_groups):  # one iterator per row group: pyarrow's
                for batch in f.iter_batches(batch_size=rows, row_groups=[group]):  # across groups grows
                    yield batch.to_pandas()
        else:
            check_header(path)
            yield from pd.read_csv(path, chunksize=rows)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read table: {exc}") from exc


def table_files(source: Path) -> list[Path]:
    """``source`` itself, or every CSV/Parquet file below it (sorted)."""
    if source.is_file():
        return [source]
    files = sorted(p for p in source.rglob("*") if is_table(p))
    if not files:
        raise InputError(f"{source}: no *.csv, *.csv.gz or *.parquet files below the directory")
    return files
