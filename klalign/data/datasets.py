"""Load and validate preference and prompt datasets from local files, before any model is loaded.

Two dataset kinds are supported, in the formats TRL 1.16 defines:

* preference: ``prompt`` / ``chosen`` / ``rejected`` columns, either all strings ("standard") or all lists of
  ``{"role", "content"}`` messages ("conversational"); the ``prompt`` column may be left out when ``chosen`` and
  ``rejected`` both start with it (TRL's implicit-prompt format, split with :func:`trl.data_utils.extract_prompt`);
* prompt-only: a ``prompt`` column of strings or of message lists.

Data is read from ``.json`` (an array of objects, or JSON Lines), ``.jsonl``, ``.parquet`` and ``.csv`` files, or
from a folder written by ``Dataset.save_to_disk``. Every problem is reported as a :class:`DataError` that names the
file, the 0-based row and the field, listing the first few offending rows at once so a user can fix them in one go.
Catching bad data here costs seconds; finding it after a model has been loaded costs minutes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk
from datasets.table import InMemoryTable
from transformers.utils import logging

logger = logging.get_logger(__name__)
from trl.data_utils import extract_prompt

from klalign.errors import ConfigError, DataError

ACCEPTED_SOURCES = "a .json, .jsonl, .parquet or .csv file, or a folder written by Dataset.save_to_disk"
ROLES = ("system", "user", "assistant", "tool")  # the roles TRL's data utilities know
MAX_REPORTED = 5  # offending rows listed in one error; the rest are only counted
TOKENIZE_BATCH = 1024  # prompts rendered and tokenized per call when checking lengths

FORMATS = {"standard": "a string (standard format)", "conversational": "a list of messages (conversational format)"}
PREFERENCE_COLUMNS = (
    "a preference dataset needs 'prompt', 'chosen' and 'rejected' columns "
    "('prompt' may be left out when chosen and rejected both start with it)"
)
PROMPT_COLUMNS = "a prompt dataset needs a 'prompt' column"

Columns = dict[str, list]  # column name -> one Python value per row


@dataclasses.dataclass
class DataArguments:
    """Which data to train and evaluate on. YAML keys map 1:1 onto these fields."""

    dataset_path: str | None = dataclasses.field(
        default=None, metadata={"help": "Training data: a JSON/JSONL/Parquet/CSV file or a save_to_disk folder."}
    )
    eval_dataset_path: str | None = dataclasses.field(default=None, metadata={"help": "Held-out data in the same format."})
    eval_fraction: float = dataclasses.field(
        default=0.0, metadata={"help": "Without eval_dataset_path, hold out this fraction of the training data."}
    )
    identical_pairs: str = dataclasses.field(
        default="error",
        metadata={"help": "Preference rows whose chosen equals rejected: 'error' (name them) or 'drop' (with a count)."},
    )

    def __post_init__(self):
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.identical_pairs not in ("error", "drop"):
            raise ConfigError(f"identical_pairs must be 'error' or 'drop', got {self.identical_pairs!r}")



class _Problems:
    """Collects problems found while scanning rows, so that one DataError can list the first few of them."""

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


# ----------------------------------------------------------------------------------------------------------------
# Public API


def load_preference_dataset(path, *, tokenizer=None, max_length: int | None = None, split: str = "train",
                            identical_pairs: str = "error") -> Dataset:
    """Load a preference dataset from a local file or save_to_disk folder, validate it, and return it.

    The result has ``prompt``, ``chosen`` and ``rejected`` columns (an implicit prompt is extracted) plus any extra
    columns of the source. ``split`` picks the split of a saved ``DatasetDict``; a single file holds one split.
    With ``tokenizer`` and ``max_length``, prompts that leave no room for a completion are rejected too.
    Rows whose chosen equals their rejected carry no preference: ``identical_pairs`` "error" (the default)
    rejects them naming the rows, "drop" leaves them out and says how many.
    """
    _check_length_arguments(tokenizer, max_length)
    data = _validate_preference(_read_source(path, split), str(path), tokenizer, max_length)
    return _identical_pairs(data, str(path), identical_pairs)


def load_prompt_dataset(path, *, tokenizer=None, max_length: int | None = None, split: str = "train") -> Dataset:
    """Load a prompt-only dataset (a ``prompt`` column) from a local file or save_to_disk folder, and validate it.

    Arguments are as for :func:`load_preference_dataset`; extra columns are kept.
    """
    _check_length_arguments(tokenizer, max_length)
    return _validate_prompts(_read_source(path, split), str(path), tokenizer, max_length)


def validate_preference_dataset(
    dataset: Dataset, source: str, *, tokenizer=None, max_length: int | None = None, identical_pairs: str = "error"
) -> Dataset:
    """Validate an in-memory preference dataset; ``source`` labels it in error messages (e.g. "train_dataset").

    Returns the dataset, with the prompt extracted into its own column when it was implicit.
    ``identical_pairs`` as for :func:`load_preference_dataset`.
    """
    _check_length_arguments(tokenizer, max_length)
    _require_dataset(dataset, source)
    return _identical_pairs(_validate_preference(dataset, source, tokenizer, max_length), source, identical_pairs)


IDENTICAL_PAIRS = ("error", "drop")


def _identical_pairs(data: Dataset, source: str, mode: str) -> Dataset:
    """Reject (mode "error") or drop (mode "drop", with a count) the rows whose chosen equals rejected."""
    if mode not in IDENTICAL_PAIRS:
        raise ValueError(f"identical_pairs must be one of {list(IDENTICAL_PAIRS)}, got {mode!r}")
    same = [i for i, (c, r) in enumerate(zip(data["chosen"], data["rejected"])) if c == r]
    if not same:
        return data
    if mode == "error":
        shown = ", ".join(str(i) for i in same[:10]) + (", ..." if len(same) > 10 else "")
        raise DataError(f"{source}: {len(same)} row(s) have 'chosen' identical to 'rejected', which carries no "
                        f"preference (rows are 0-based): {shown}. Fix the data, or set identical_pairs: drop")
    kept = sorted(set(range(data.num_rows)) - set(same))
    if not kept:
        raise DataError(f"{source}: every row has 'chosen' identical to 'rejected'; nothing is left to train on")
    logger.warning(f"{source}: dropped {len(same)} of {data.num_rows} rows whose 'chosen' equals 'rejected'")
    return data.select(kept)


def validate_prompt_dataset(
    dataset: Dataset, source: str, *, tokenizer=None, max_length: int | None = None
) -> Dataset:
    """Validate an in-memory prompt-only dataset; ``source`` labels it in error messages. Returns the dataset."""
    _check_length_arguments(tokenizer, max_length)
    _require_dataset(dataset, source)
    return _validate_prompts(dataset, source, tokenizer, max_length)


# ----------------------------------------------------------------------------------------------------------------
# Validation. `data` is a Dataset, or the columns of a JSON/CSV file: those stay Python values until validated,
# because Arrow refuses a column whose rows mix types without saying which row is at fault.


def _validate_preference(data: Dataset | Columns, source: str, tokenizer, max_length: int | None) -> Dataset:
    """Check a preference dataset, extract an implicit prompt, check prompt lengths; return it as a Dataset."""
    columns = _required_columns(data, source, ["chosen", "rejected"], PREFERENCE_COLUMNS, optional=["prompt"])
    implicit_prompt = "prompt" not in columns
    data_format = _check_rows(columns, list(columns), source)
    if implicit_prompt:
        columns = _extract_prompts(columns, source)
    _check_prompt_lengths(columns["prompt"], data_format, source, tokenizer, max_length)
    return _as_dataset(data, columns if implicit_prompt else {}, source)


def _validate_prompts(data: Dataset | Columns, source: str, tokenizer, max_length: int | None) -> Dataset:
    """Check a prompt-only dataset and its prompt lengths; return it as a Dataset."""
    columns = _required_columns(data, source, ["prompt"], PROMPT_COLUMNS)
    data_format = _check_rows(columns, ["prompt"], source)
    _check_prompt_lengths(columns["prompt"], data_format, source, tokenizer, max_length)
    return _as_dataset(data, {}, source)


def _check_length_arguments(tokenizer, max_length: int | None) -> None:
    """Reject a max_length that cannot be checked or honoured; these are caller mistakes, not data errors."""
    if max_length is None:
        return
    if tokenizer is None:
        raise ValueError("max_length needs a tokenizer to count prompt tokens")
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")


def _require_dataset(dataset, source: str) -> None:
    if isinstance(dataset, DatasetDict):
        raise TypeError(f"{source}: got a DatasetDict with splits {list(dataset)}; pass a single split")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"{source}: expected a datasets.Dataset, got {type(dataset).__name__}")


def _required_columns(data, source: str, required: list[str], expected: str, optional: tuple | list = ()) -> Columns:
    """Return the required (and present optional) columns as Python lists, after checking the data has rows."""
    names = data.column_names if isinstance(data, Dataset) else list(data)
    num_rows = data.num_rows if isinstance(data, Dataset) else len(next(iter(data.values()), []))
    if num_rows == 0:
        raise DataError(f"{source}: the dataset has no rows")
    missing = [name for name in required if name not in names]
    if missing:
        listed = ", ".join(repr(name) for name in missing)
        raise DataError(f"{source}: missing column {listed}; columns present: {names}; {expected}")
    wanted = [name for name in (*optional, *required) if name in names]
    if isinstance(data, Dataset):
        return data.with_format(None, columns=wanted)[:]
    return {name: data[name] for name in wanted}


def _check_rows(columns: Columns, fields: list[str], source: str) -> str:
    """Check every value of `fields` and that all rows share one format; return it ("standard"/"conversational")."""
    problems = _Problems(source)
    first = None  # (format, row) of the first well-formed row
    for row, values in enumerate(zip(*(columns[field] for field in fields))):
        row_format = _row_format(row, dict(zip(fields, values)), problems)
        if row_format is None:
            continue
        if first is None:
            first = (row_format, row)
        elif row_format != first[0]:
            problems.add_row(
                row,
                fields[0],
                f"is {FORMATS[row_format]} but row {first[1]} is {FORMATS[first[0]]}; "
                "every row must use the same format",
            )
    problems.raise_if_any("invalid rows")
    return first[0]


def _row_format(row: int, values: dict[str, Any], problems: _Problems) -> str | None:
    """Check one row's fields; return their common format, or None after recording what is wrong."""
    formats = {}
    for field, value in values.items():
        problem = _value_problem(value)
        if problem:
            problems.add_row(row, field, problem)
        else:
            formats[field] = "standard" if isinstance(value, str) else "conversational"
    if len(formats) < len(values):
        return None
    first_field, row_format = next(iter(formats.items()))
    for field, value_format in formats.items():
        if value_format != row_format:
            problems.add_row(
                row,
                field,
                f"is {FORMATS[value_format]} but field {first_field!r} is {FORMATS[row_format]}; "
                "the fields of a row must share one format (when chosen and rejected hold the whole conversation, "
                "drop the 'prompt' column and the prompt is taken from their shared start)",
            )
            return None
    return row_format


def _value_problem(value: Any) -> str | None:
    """Say why `value` cannot be a prompt/chosen/rejected value, or return None when it can."""
    if value is None:
        return "is missing (null)"
    if isinstance(value, str):
        return None if value.strip() else "is an empty string"
    if isinstance(value, list):
        if not value:
            return "is an empty list of messages"
        for index, message in enumerate(value):
            problem = _message_problem(message)
            if problem:
                return f"message {index} {problem}"
        return None
    if isinstance(value, dict):
        return "is a single object; a conversational field holds a list of messages"
    return f"must be a string or a list of messages, got {type(value).__name__} {value!r:.60}"


def _message_problem(message: Any) -> str | None:
    """Say why `message` is not a {"role", "content"} chat message, or return None when it is."""
    if not isinstance(message, dict):
        return f"is {type(message).__name__} {message!r:.60}, not an object with 'role' and 'content'"
    role, content = message.get("role"), message.get("content")
    if role is None:
        return "has no 'role'"
    if role not in ROLES:
        return f"has unknown role {role!r} (expected one of {', '.join(ROLES)})"
    if content is None:
        return "has no 'content'"
    if not isinstance(content, str):
        return f"has content of type {type(content).__name__}, expected a string"
    if not content.strip():
        return "has empty content"
    return None


def _extract_prompts(columns: Columns, source: str) -> Columns:
    """Split implicit-prompt rows into prompt/chosen/rejected with TRL's extract_prompt, checking nothing empties."""
    problems = _Problems(source)
    extracted: Columns = {"prompt": [], "chosen": [], "rejected": []}
    for row, (chosen, rejected) in enumerate(zip(columns["chosen"], columns["rejected"])):
        example = extract_prompt({"chosen": chosen, "rejected": rejected})
        if not _has_content(example["prompt"]):
            problems.add_row(row, "prompt", "chosen and rejected do not start alike, so there is no prompt to extract")
        for field in ("chosen", "rejected"):
            if not _has_content(example[field]):
                problems.add_row(row, field, "is empty once the prompt shared with the other completion is removed")
        for field, values in extracted.items():
            values.append(example[field])
    problems.raise_if_any(
        "rows without a usable implicit prompt (there is no 'prompt' column, so the prompt is taken from the "
        "shared start of chosen and rejected)"
    )
    return extracted


def _has_content(value: str | list) -> bool:
    return bool(value.strip()) if isinstance(value, str) else bool(value)


def _check_prompt_lengths(prompts: list, data_format: str, source: str, tokenizer, max_length: int | None) -> None:
    """Reject prompts whose token count is >= max_length, counted the way TRL's trainers count them.

    TRL drops such rows silently (nothing would be left of the completion). Conversational prompts are rendered
    with the chat template and add_generation_prompt=True, then tokenized without extra special tokens; standard
    prompts are tokenized as they are. Work is done in batches so that 100k rows take seconds.
    """
    if tokenizer is None or max_length is None:
        return
    conversational = data_format == "conversational"
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: the prompts are conversational but the tokenizer has no chat template")
    problems = _Problems(source)
    for start in range(0, len(prompts), TOKENIZE_BATCH):
        batch = prompts[start : start + TOKENIZE_BATCH]
        texts = _render_prompts(batch, start, tokenizer, problems) if conversational else batch
        rows = [start + offset for offset, text in enumerate(texts) if text is not None]
        # Tokenized as TRL does: the chat template already holds any BOS token, a plain prompt gets the special tokens.
        encoded = tokenizer(
            [texts[row - start] for row in rows],
            add_special_tokens=not conversational,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        for row, ids in zip(rows, encoded["input_ids"]):
            if len(ids) >= max_length:
                problems.add_row(
                    row, "prompt", f"is {len(ids)} tokens, leaving no room for a completion in max_length={max_length}"
                )
    problems.raise_if_any(f"prompts too long for max_length={max_length}; shorten or drop these rows, or raise it")


def _render_prompts(prompts: list, first_row: int, tokenizer, problems: _Problems) -> list[str | None]:
    """Render conversational prompts with the chat template; None for a prompt the template rejects (recorded)."""
    try:
        return tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template may raise anything for some conversation: render row by row to name it
        return [_render_prompt(prompt, row, tokenizer, problems) for row, prompt in enumerate(prompts, first_row)]


def _render_prompt(prompt: list, row: int, tokenizer, problems: _Problems) -> str | None:
    try:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # the template's own message (e.g. from raise_exception) is the useful report
        problems.add_row(row, "prompt", f"is rejected by the tokenizer's chat template: {error}")
        return None


def _as_dataset(data: Dataset | Columns, updates: Columns, source: str) -> Dataset:
    """Return `data` as a Dataset with the `updates` columns placed first (replacing any of the same name)."""
    if isinstance(data, Dataset):
        kept = [name for name in data.column_names if name not in updates]
        if not updates or not kept:
            return Dataset.from_dict(updates) if updates else data
        # Flattening in memory first stops concatenate_datasets writing a cache file into a save_to_disk folder.
        rest = data.select_columns(kept).flatten_indices(keep_in_memory=True)
        return concatenate_datasets([Dataset.from_dict(updates), rest], axis=1)
    columns = {**updates, **{name: values for name, values in data.items() if name not in updates}}
    for name, values in columns.items():  # the checked columns convert; an extra one may still mix types
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError) as error:
            raise DataError(f"{source}: column {name!r} mixes value types across rows ({error})") from None
    return Dataset(InMemoryTable(pa.table(columns)))


# ----------------------------------------------------------------------------------------------------------------
# Reading files


def _read_source(path, split: str) -> Dataset | Columns:
    """Read a local file or save_to_disk folder: a Dataset, or Python columns for JSON and CSV (see above)."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder; expected {ACCEPTED_SOURCES} "
            "(datasets are read from local paths only, never fetched from the Hugging Face Hub)"
        )
    if path.is_dir():
        return _read_saved_dataset(path, split)
    readers = {".json": _read_json, ".jsonl": _read_json_lines, ".parquet": _read_parquet, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        kind = repr(path.suffix) if path.suffix else "(no extension)"
        raise DataError(f"{path}: unsupported file type {kind}; expected {ACCEPTED_SOURCES}")
    return reader(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None


def _read_json(path: Path) -> Columns:
    """Read a JSON array of row objects; a .json file holding JSON Lines (as Dataset.to_json writes) works too."""
    text = _read_text(path)
    if not text.strip():
        return {}
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # a first value parsed and more follow: JSON Lines
            return _read_json_lines(path, text)
        raise DataError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of row objects, or one object per line (JSON Lines)")
    problems = _Problems(str(path))
    for row, record in enumerate(rows):
        if not isinstance(record, dict):
            problems.add(f"row {row}", f"expected a JSON object, got {type(record).__name__}")
    problems.raise_if_any("array items that are not row objects")
    return _records_to_columns(rows, path)


def _read_json_lines(path: Path, text: str | None = None) -> Columns:
    """Parse one JSON object per line (blank lines skipped), naming the 1-based lines that fail; `text` if read."""
    records, problems = [], _Problems(str(path))
    for line_number, line in enumerate((text or _read_text(path)).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.add(f"line {line_number}", f"invalid JSON ({error.msg} at column {error.colno})")
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            problems.add(f"line {line_number}", f"expected a JSON object, got {type(record).__name__}")
    problems.raise_if_any("lines that are not JSON objects")
    return _records_to_columns(records, path)


def _read_csv(path: Path) -> Columns:
    """Read a CSV file with a header row; every value is a string (so only the standard format fits in CSV)."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    records, problems = [], _Problems(str(path))
    try:
        for record in reader:
            if None in record:  # DictReader files surplus values under the key None
                problems.add(f"line {reader.line_num}", "has more values than the header has columns")
            records.append(record)
    except csv.Error as error:
        raise DataError(f"{path}: invalid CSV at line {reader.line_num}: {error}") from None
    problems.raise_if_any("malformed CSV lines")
    return _records_to_columns(records, path)


def _records_to_columns(records: list[dict], path: Path) -> Columns:
    """Turn row objects into columns; a key absent from a row becomes None there (reported as missing)."""
    names = list(dict.fromkeys(name for record in records for name in record))
    if records and not names:
        raise DataError(f"{path}: the rows hold no fields")
    return {name: [record.get(name) for record in records] for name in names}


def _read_parquet(path: Path) -> Dataset:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    return Dataset(InMemoryTable(table))


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
