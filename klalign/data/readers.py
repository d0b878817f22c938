"""Read a local file or save_to_disk folder into a Dataset with `datasets`' own readers, turning every failure into
a DataError that names the file (and the line or row at fault where that can be known).

``.json`` (an array of row objects, or JSON Lines) and ``.jsonl`` go through ``load_dataset("json")``, ``.csv``
through ``load_dataset("csv")``, ``.parquet`` through ``load_dataset("parquet")``, and folders through
``load_from_disk``. A file is read into memory; the Arrow files `datasets` writes on the way go to a temporary
folder deleted straight after, so no read is cached (a file changed on disk is read anew) and nothing is written
to the user's datasets cache. Validation (rows, fields, formats) is the caller's: see `klalign.data.datasets`.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import re
import tempfile
import warnings
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from pandas.errors import ParserWarning

from klalign.errors import DataError

ACCEPTED_SOURCES = "a .json, .jsonl, .parquet or .csv file, or a folder written by Dataset.save_to_disk"
MAX_REPORTED = 5  # offending rows listed in one error; the rest are only counted


class Problems:
    """Collects problems found while scanning rows or lines, so that one DataError can list the first few of them.
    Used here for lines of JSON, and by `klalign.data.datasets` for rows."""

    def __init__(self, source: str):
        self.source = source
        self.count = 0
        self.shown: list[str] = []

    def add(self, location: str, what: str) -> None:
        self.count += 1
        if len(self.shown) < MAX_REPORTED:
            self.shown.append(f"{location}: {what}")

    def add_row(self, row: int, field: str, what: str) -> None:
        self.add(f"row {row}, field {field!r}", what)

    def raise_if_any(self, summary: str) -> None:
        """Raise one DataError listing the problems found so far, if any."""
        if not self.count:
            return
        lines = [f"{self.source}: {summary} ({self.count} found; rows are 0-based):"]
        lines += [f"  {problem}" for problem in self.shown]
        if self.count > len(self.shown):
            lines.append(f"  ... and {self.count - len(self.shown)} more")
        raise DataError("\n".join(lines))


def read_source(path, split: str) -> Dataset:
    """Read a local file, or a save_to_disk folder (taking `split` of a DatasetDict), into a Dataset."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder; expected {ACCEPTED_SOURCES} "
            "(datasets are read from local paths only, never fetched from the Hugging Face Hub)"
        )
    if path.is_dir():
        return _read_saved_dataset(path, split)
    readers = {".json": _read_json, ".jsonl": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        kind = repr(path.suffix) if path.suffix else "(no extension)"
        raise DataError(f"{path}: unsupported file type {kind}; expected {ACCEPTED_SOURCES}")
    return reader(path)


def _load(kind: str, path: Path, **config) -> Dataset:
    """One local file through `datasets`' packaged `kind` reader, into memory, with no cache kept (see above)."""
    files = glob.escape(str(path.resolve()))  # data_files are glob patterns: "a[1].jsonl" would match nothing
    with tempfile.TemporaryDirectory(prefix="klalign-read-") as cache, _quiet():
        return load_dataset(kind, data_files=files, split="train", cache_dir=cache, keep_in_memory=True, **config)


@contextlib.contextmanager
def _quiet():
    """Hold back datasets' progress bar and its error logs while reading: every failure becomes one DataError,
    which a recipe prints as its one line."""
    bars_forced = datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None  # the variable has the last word
    show_bars = not bars_forced and not datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    if show_bars:
        datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if show_bars:
            datasets.utils.enable_progress_bars()


def _reason(error: BaseException) -> str:
    """What went wrong inside datasets (a DatasetGenerationError's own message says only that something did)."""
    return str(error.__cause__ or error).strip()


# ----------------------------------------------------------------------------------------------------------------
# JSON and JSON Lines


def _read_json(path: Path) -> Dataset:
    """A JSON array of row objects, or one object per line (JSON Lines, as Dataset.to_json writes, in .json too).

    datasets' reader keeps a column whose rows mix types (a string here, a list of messages there) as JSON values,
    so the validation can name the row; but when it fails it names neither line nor row, so the file is then parsed
    again with the json module to say where (`_explain_json`, what is kept of klalign's own JSON reader).
    """
    # The reader takes its column types from its first chunk (10 MB by default) and casts later chunks to them, so a
    # list of messages past it would silently become a string: one chunk holds the whole file.
    chunksize = max(path.stat().st_size + 1, 10 << 20)
    try:
        data = _load("json", path, parse_agent_traces=False, chunksize=chunksize)
        data.data.validate(full=True)  # pyarrow's JSON parser lets bytes that are not UTF-8 into its strings
    except Exception as error:  # any failure: torn line, non-object row, bad bytes, no rows at all
        if _explain_json(path) == 0:  # raises a DataError naming the lines or rows, when it finds them
            return Dataset.from_dict({})  # the caller reports "no rows"
        raise DataError(f"{path}: not readable as JSON ({_reason(error)})") from error
    if data.num_rows == 1 and path.suffix.lower() == ".json":
        _explain_json(path)  # datasets reads a single object (e.g. {"prompt": [...], ...}) as one row: refuse it
    return data


def _explain_json(path: Path) -> int:
    """Parse the file with the json module as klalign's reader did; raise a DataError naming the first lines (JSON
    Lines) or rows (an array) that are not JSON objects, or return the number of rows."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None
    if not text.strip():
        return 0
    problems, items = Problems(str(path)), None
    if path.suffix.lower() == ".json":  # an array, or JSON Lines; a .jsonl file is read line by line
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # "Extra data": a first value parsed and more follow, so JSON Lines
                where = f"line {error.lineno}, column {error.colno}"
                raise DataError(f"{path}: invalid JSON at {where}: {error.msg}") from None
        else:
            if not isinstance(items, list):
                raise DataError(f"{path}: expected a JSON array of row objects, or one object per line (JSON Lines)")
    where, numbered = ("line", _json_lines(text, problems)) if items is None else ("row", enumerate(items))
    rows = fields = 0
    for number, record in numbered:
        rows, fields = rows + 1, fields + bool(record)
        if not isinstance(record, dict):
            problems.add(f"{where} {number}", f"expected a JSON object, got {type(record).__name__}")
    problems.raise_if_any(f"{'array items' if where == 'row' else 'lines'} that are not JSON objects")
    if rows and not fields:
        raise DataError(f"{path}: the rows hold no fields")
    return rows


def _json_lines(text: str, problems: Problems):
    """(line number, value) for each non-blank line of JSON Lines text; a line that is not JSON goes to `problems`."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                problems.add(f"line {number}", f"invalid JSON ({error.msg} at column {error.colno})")


# ----------------------------------------------------------------------------------------------------------------
# CSV, Parquet, save_to_disk folders


def _read_csv(path: Path) -> Dataset:
    """A CSV file with a header row, every value read as a string (so only the standard format fits in CSV).

    pandas, under datasets' reader, would make "4" an int, "NA" or an empty field a null, and a first data line with
    more values than the header an index column (shifting the values under the wrong names). The header, read here
    with the csv module, gives every column the string type; na_filter=False keeps values as written; index_col=False
    with pandas' ParserWarning raised turns the extra values into an error instead.
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            lines = csv.reader(file)
            header = next(lines, [])
            has_rows = any(values for values in lines)  # stops at the first non-blank line after the header
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None
    except csv.Error as error:
        raise DataError(f"{path}: invalid CSV ({error})") from None
    if not has_rows:
        return Dataset.from_dict({})  # the caller reports "no rows"
    if len(set(header)) < len(header):  # pandas would rename the second "x" to "x.1", and the string types drop it
        raise DataError(f"{path}: the header names a column twice: {header}")
    features = Features({name: Value("string") for name in header})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ParserWarning)
            return _load("csv", path, features=features, na_filter=False, index_col=False)
    except Exception as error:
        reason, cause = _reason(error), error.__cause__
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(f"{path}: not UTF-8 text ({reason})") from None
        extra = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", reason)  # pandas' C parser
        if extra:
            raise DataError(f"{path}: malformed CSV at line {extra[2]}: has more values than the header has columns "
                            f"({extra[3]} values, {extra[1]} columns)") from None
        if isinstance(cause, ParserWarning):  # pandas says this of the first line after the header only
            raise DataError(f"{path}: malformed CSV: the first line after the header has more values than the "
                            f"header has columns ({reason})") from None
        raise DataError(f"{path}: invalid CSV ({reason})") from None


def _read_parquet(path: Path) -> Dataset:
    try:
        return _load("parquet", path)
    except Exception as error:
        with contextlib.suppress(Exception):  # datasets refuses a file with no rows; klalign says "no rows"
            if pq.read_metadata(path).num_rows == 0:
                return Dataset.from_dict({})
        raise DataError(f"{path}: not a readable Parquet file ({_reason(error)})") from None


def _read_saved_dataset(path: Path, split: str) -> Dataset:
    """Load a save_to_disk folder; from a DatasetDict, take `split`."""
    try:
        saved = load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(
            f"{path}: not a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk ({error}); "
            f"expected {ACCEPTED_SOURCES}"
        ) from None
    except (OSError, ValueError, pa.ArrowException) as error:
        raise DataError(f"{path}: could not load the saved dataset ({error})") from None
    if isinstance(saved, DatasetDict):
        if split not in saved:
            raise DataError(f"{path}: no split {split!r}; splits present: {list(saved)}")
        return saved[split]
    return saved
