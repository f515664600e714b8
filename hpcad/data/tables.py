"""Reading CSV/Parquet tables whole or in chunks, with errors that name the file; what export files
hold besides clean tables is left out here (a row cut short at a CSV's end or inside it, lines
repeating its header, comment lines: found by hpcad/data/linescan.py; reports under header lines:
hpcad/data/sections.py), and said (docs/data.md). Which files a folder holds: hpcad/data/paths.py;
a CSV's dialect: hpcad/data/csvtext.py."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.data.csvtext import CsvDialect, cut_reason, dialect
from hpcad.data.linescan import named_fields, rows_cut_short, scan_file
from hpcad.data.paths import is_parquet
from hpcad.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
CHUNK_ROWS = 200_000


def columns(path: Path) -> list[str]:
    """A table's column names without reading its rows (CSV header line, Parquet schema)."""
    if is_parquet(path):
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:
            raise InputError(f"{path}: cannot read the Parquet schema: {exc}") from exc
    how = dialect(path)
    if how.sections:
        from hpcad.data import sections

        return sections.columns(path, how)
    return [name for name in how.header if name.strip()]  # an unnamed column holds no metric


def without_unnamed(df: pd.DataFrame, how: CsvDialect, path: Path) -> pd.DataFrame:
    """``df`` without the columns its CSV header leaves unnamed (a separator at the end of every line
    makes one, which pandas calls ``Unnamed: k``): dropped when empty, an error when they hold values."""
    unnamed = [k for k, name in enumerate(how.header) if not name.strip() and k < len(df.columns)]
    if not unnamed:
        return df
    filled = [k for k in unnamed if df.iloc[:, k].notna().any()]
    if filled:
        raise InputError(f"{path}: column {filled[0] + 1} holds values but has no name in the header line; "
                         f"name it (or remove it)")
    return df.drop(columns=[df.columns[k] for k in unnamed])


def without_cut_row(chunks: Iterable[pd.DataFrame], why: str | None) -> Iterator[pd.DataFrame]:
    """``chunks`` as they come; with ``why`` (``cut_reason``), without the last chunk's last row,
    logged. Holds one chunk back only then."""
    if why is None:
        yield from chunks
        return
    held = None
    for chunk in chunks:
        if held is not None:
            yield held
        held = chunk
    log.warning(why)
    if held is not None:
        yield held.iloc[:-1]


def csv_options(path: Path, how: CsvDialect) -> tuple[dict, str | None]:
    """pandas.read_csv's options for the CSV ``path`` (plain or gzip): its dialect's (``how``) and
    the lines to skip (``scan_lines``: lines repeating its header and comments, logged; rows cut
    short inside it, a warning); and whether its last row is cut short (``cut_reason``), for
    ``without_cut_row``."""
    kw = how.read_csv_kw()
    scan = scan_file(path, how.sep, len(how.header), named := named_fields(how))
    if scan.repeats:
        log.info("%s: skipped %d line(s) repeating the header line (files joined with cat?), the first at line %d",
                 path, len(scan.repeats), scan.repeats[0] + 1)
    if scan.comments:
        log.info("%s: skipped %d comment line(s) (starting with #), the first at line %d", path, len(scan.comments),
                 scan.comments[0] + 1)
    skip = sorted(set(scan.repeats + scan.comments + rows_cut_short(path, scan, named)))
    if skip:
        kw["skiprows"] = skip
    return kw, cut_reason(scan.tail, path, how.sep, len(how.header))


def unreadable(path: Path, exc: Exception) -> InputError:
    """The error for a table pandas or pyarrow could not read, naming the file; a CSV row with more
    fields than the header gets its likely cause."""
    hint = ""
    if "C error: Expected" in str(exc):  # pandas: "Expected 161 fields in line 102, saw 238"
        hint = (" (a row with more fields than the header: two rows run together where a writer stopped mid-row "
                "and went on without a line end, or a separator inside a value)")
    return InputError(f"{path}: cannot read table: {str(exc).strip()}{hint}")


def read_table(path: Path, as_text: bool = False) -> pd.DataFrame:
    """``path`` whole; ``as_text``: a CSV's cells as text (no type guessing: ``007`` stays ``007``)."""
    import pandas as pd

    if is_parquet(path):
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types; name the file either way
            raise unreadable(path, exc) from exc
    how = dialect(path)
    if how.sections:
        from hpcad.data import sections

        return sections.read(path, how, as_text=as_text)
    try:
        kw, cut = csv_options(path, how)
        df = pd.read_csv(path, **kw, **({"dtype": str} if as_text else {}))
    except Exception as exc:  # pandas raises many types; name the file either way
        raise unreadable(path, exc) from exc
    return without_unnamed(next(without_cut_row([df], cut)), how, path)


def read_node_map(path: Path, column: str, option: str, about: str = "") -> dict[str, str]:
    """A table of the columns ``node`` and ``column`` as node -> value (``data.node_names``,
    ``nightly.groups``); a missing column, an empty cell and a node given two values are errors
    naming the file, ``option`` (with ``about``, what the columns hold) and the line."""
    df = read_table(path, as_text=True)  # names such as 007 keep their zeros
    cols = {str(c).strip().lower(): c for c in df.columns}
    if "node" not in cols or column not in cols:
        raise InputError(f"{path}: {option} needs the columns node and {column}{about}; it has {list(df.columns)}")
    out: dict[str, str] = {}
    for line, (node, value) in enumerate(zip(df[cols["node"]], df[cols[column]]), start=2):
        node, value = str(node).strip(), str(value).strip()
        if not node or not value or node == "nan" or value == "nan":
            raise InputError(f"{path}: line {line}: an empty node or {column}")
        if out.get(node, value) != value:
            raise InputError(f"{path}: line {line}: node {node!r} has the {column} {out[node]!r} on an earlier line "
                             f"and {value!r} here")
        out[node] = value
    return out


def iter_table_chunks(path: Path, rows: int = CHUNK_ROWS, text: tuple[str, ...] = ()) -> Iterator[pd.DataFrame]:
    """``path`` in chunks of ``rows`` rows; a CSV's ``text`` columns read as text (node names such as
    ``007`` keep their zeros; pandas' type guessing made them the number 7)."""
    import pandas as pd

    try:
        if is_parquet(path):
            import pyarrow.parquet as pq

            f = pq.ParquetFile(path)
            for group in range(f.metadata.num_row_groups):  # one iterator per row group: pyarrow's
                for batch in f.iter_batches(batch_size=rows, row_groups=[group]):  # across groups grows
                    yield batch.to_pandas()
        elif (how := dialect(path)).sections:  # read whole: its reports are joined by sample
            from hpcad.data import sections

            yield sections.read(path, how, text)
        else:
            kw = {"dtype": {c: str for c in text}} if text else {}
            options, cut = csv_options(path, how)
            for chunk in without_cut_row(pd.read_csv(path, chunksize=rows, **options, **kw), cut):
                yield without_unnamed(chunk, how, path)
    except InputError:
        raise
    except Exception as exc:
        raise unreadable(path, exc) from exc
