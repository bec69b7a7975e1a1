"""What the evaluation scripts share: their errors, result files and the summary table."""
import csv
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

__all__ = [
    'EvaluationError', 'DatasetError', 'ClassCountMismatchError',
    'format_table', 'unwrap_worker_error', 'write_results',
]


class EvaluationError(RuntimeError):
    """An evaluation cannot run as asked; the message says what is wrong and what to do."""


class DatasetError(EvaluationError):
    """The dataset is missing, unreadable or not in the layout the evaluation reads."""


class ClassCountMismatchError(EvaluationError):
    """The dataset's classes do not fit the model's outputs."""


def unwrap_worker_error(error: BaseException) -> str:
    """The original message of an error re-raised by a DataLoader worker, without the worker's traceback.

    A worker's exception reaches the main process as the same type whose message is the whole remote
    traceback; its last line holds what the worker raised (``module.Type: message``).
    """
    text = str(error)
    if 'Original Traceback' not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return re.sub(r'^[\w.]+(Error|Exception): ', '', last)


def write_results(path: Union[str, Path], results: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]],
                  fmt: str = 'csv') -> None:
    """Write results as timm's validate.py does: json (a dict for one model, a list for several) or csv rows."""
    if fmt not in ('csv', 'json'):
        raise ValueError(f'results format must be csv or json, got {fmt!r}')
    path = Path(path)
    if path.parent != Path(''):
        path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w', newline='') as f:
        if fmt == 'json':
            json.dump(results, f, indent=4)
            return
        rows = [results] if isinstance(results, Mapping) else list(results)
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Optional[List[str]] = None,
                 floatfmt: Optional[Dict[str, str]] = None) -> str:
    """A plain-text table of ``rows`` (dicts), text left-aligned and numbers right-aligned.

    ``columns`` picks and orders the keys (default: the first row's); ``floatfmt`` maps a column to a
    format spec for its floats (default ``.3f``); missing values print as ``-``.
    """
    if not rows:
        return ''
    columns = columns or list(rows[0].keys())
    floatfmt = floatfmt or {}

    def cell(row: Mapping[str, Any], col: str) -> str:
        value = row.get(col)
        if value is None:
            return '-'
        if isinstance(value, float):
            return format(value, floatfmt.get(col, '.3f'))
        return str(value)

    cells = [[cell(r, c) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return '  '.join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return '\n'.join([line(columns), line(['-' * w for w in widths])] + [line(row) for row in cells])
