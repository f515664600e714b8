"""Stray cells that are no number in a metric column: a collector's ``err``, ``#N/A``, ``-`` or a
blank written in place of a sample. A column of numbers with a few of them reads them as missing
samples (a warning names the file, the columns, how many and an example, and the report lists it
under "Input warnings"); a column where more than :data:`STRAY_SHARE` of the cells are no number
(text: states, host names, numbers with units or a decimal comma) stays an error, as before.
Until 2026-12-05 one such cell failed the whole ingest (or, with ``data.on_bad_node=skip``, the
node's whole file), a night of thousands of nodes included."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from hpcad.data.csvtext import looks_decimal_comma

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

STRAY_SHARE = 0.01  # at most this share of a column's cells may be no number and be read as missing


def as_numbers(raw: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """``raw`` as numbers (missing where a cell is no number) and the mask of its cells that are no
    number and not empty: what the readers' errors quote and what :func:`stray_mask` judges."""
    import pandas as pd

    num = pd.to_numeric(raw, errors="coerce")
    return num, (num.isna() & raw.notna()).to_numpy()


def text_after_all(raw: pd.Series, stray: np.ndarray, names: frozenset[str]) -> bool:
    """Whether the cells ``stray`` of ``raw`` say the column is text, few as they are: a number
    written with a decimal comma, or one of the table's column ``names`` (a header line inside the
    file). Errors that say so are more use than a column read as missing."""
    import pandas as pd

    odd = [str(v).strip() for v in pd.unique(raw[stray])[:20]]
    return any(looks_decimal_comma(v) or v in names for v in odd)


def stray_mask(raw: pd.Series, names: frozenset[str]) -> tuple[pd.Series, np.ndarray] | None:
    """``raw`` as numbers and the mask of its stray cells (no number, not empty), or None where the
    column is text rather than numbers with a few stray cells: more than :data:`STRAY_SHARE` of its
    cells are no number, none is a number, or :func:`text_after_all`."""
    num, stray = as_numbers(raw)
    if int(stray.sum()) > STRAY_SHARE * len(raw) or not num.notna().any() or text_after_all(raw, stray, names):
        return None
    return num, stray


def stray_as_missing(frame: pd.DataFrame, columns: list, where: str) -> tuple[pd.DataFrame, list]:
    """``frame`` with the stray cells of its non-numeric ``columns`` read as missing, and the columns
    that are text (the caller's error). One warning per call names the columns, how many cells and
    an example."""
    text, fixed, said = [], {}, {}
    names = frozenset(map(str, frame.columns))
    for c in columns:
        found = stray_mask(frame[c], names)
        if found is None:
            text.append(c)
            continue
        fixed[c] = found[0]
        said[c] = (int(found[1].sum()), frame[c][found[1]].iloc[0])
    if fixed:
        frame = frame.copy()  # the caller's frame stays as read
        for c, v in fixed.items():
            frame[c] = v
        first = next(iter(said))
        log.warning("%s: %d cell(s) that are no number in metric column(s) %s (e.g. %s=%r) read as missing "
                    "(at most %g%% of a column's cells; more is an error)", where, sum(n for n, _ in said.values()),
                    list(said)[:10], first, said[first][1], 100 * STRAY_SHARE)
    return frame, text

