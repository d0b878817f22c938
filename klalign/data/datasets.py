"""Load and validate preference and prompt datasets from local files, before any model is loaded.

Two dataset kinds are supported, in the formats TRL 1.16 defines:

* preference: ``prompt`` / ``chosen`` / ``rejected`` columns, either all strings ("standard") or all lists of
  ``{"role", "content"}`` messages ("conversational"); the ``prompt`` column may be left out when ``chosen`` and
  ``rejected`` both start with it (TRL's implicit-prompt format, split with :func:`trl.data_utils.extract_prompt`);
* prompt-only: a ``prompt`` column of strings or of message lists.

Data is read (by `klalign.data.readers`, with `datasets`' own readers) from ``.json`` (an array of objects, or
JSON Lines), ``.jsonl``, ``.parquet`` and ``.csv`` files, or from a folder written by ``Dataset.save_to_disk``.
Every problem is reported as a :class:`DataError` that names the file, the 0-based row and the field, listing the
first few offending rows at once so a user can fix them in one go. Catching bad data here costs seconds; finding
it after a model has been loaded costs minutes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets
from transformers.utils import logging
from trl.data_utils import extract_prompt

from klalign.data.readers import Problems, read_source
from klalign.errors import ConfigError, DataError

logger = logging.get_logger(__name__)

ROLES = ("system", "user", "assistant", "tool")  # the roles TRL's data utilities know
TOKENIZE_BATCH = 1024  # prompts rendered and tokenized per call when checking lengths

FORMATS = {"standard": "a string (standard format)", "conversational": "a list of messages (conversational format)"}
PREFERENCE_COLUMNS = (
    "a preference dataset needs 'prompt', 'chosen' and 'rejected' columns "
    "('prompt' may be left out when chosen and rejected both start with it)"
)
PROMPT_COLUMNS = "a prompt dataset needs a 'prompt' column"

Columns = dict[str, list]  # column name -> one Python value per row (the validated columns of a Dataset)


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
    data = _validate_preference(read_source(path, split), str(path), tokenizer, max_length)
    return _identical_pairs(data, str(path), identical_pairs)


def load_prompt_dataset(path, *, tokenizer=None, max_length: int | None = None, split: str = "train") -> Dataset:
    """Load a prompt-only dataset (a ``prompt`` column) from a local file or save_to_disk folder, and validate it.

    Arguments are as for :func:`load_preference_dataset`; extra columns are kept.
    """
    _check_length_arguments(tokenizer, max_length)
    return _validate_prompts(read_source(path, split), str(path), tokenizer, max_length)


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
# Validation. A column whose rows mix types (a string here, a list of messages there) reaches it as Python values:
# datasets' JSON reader keeps such a column as JSON, so that the row at fault can be named here.


def _validate_preference(data: Dataset, source: str, tokenizer, max_length: int | None) -> Dataset:
    """Check a preference dataset, extract an implicit prompt, check prompt lengths; return it."""
    columns = _required_columns(data, source, ["chosen", "rejected"], PREFERENCE_COLUMNS, optional=["prompt"])
    implicit_prompt = "prompt" not in columns
    data_format = _check_rows(columns, list(columns), source)
    if implicit_prompt:
        columns = _extract_prompts(columns, source)
    _check_prompt_lengths(columns["prompt"], data_format, source, tokenizer, max_length)
    return _with_columns_first(data, columns) if implicit_prompt else data


def _validate_prompts(data: Dataset, source: str, tokenizer, max_length: int | None) -> Dataset:
    """Check a prompt-only dataset and its prompt lengths; return it."""
    columns = _required_columns(data, source, ["prompt"], PROMPT_COLUMNS)
    data_format = _check_rows(columns, ["prompt"], source)
    _check_prompt_lengths(columns["prompt"], data_format, source, tokenizer, max_length)
    return data


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


def _required_columns(
    data: Dataset, source: str, required: list[str], expected: str, optional: tuple | list = ()
) -> Columns:
    """Return the required (and present optional) columns as Python lists, after checking the data has rows."""
    names = data.column_names
    if data.num_rows == 0:
        raise DataError(f"{source}: the dataset has no rows")
    missing = [name for name in required if name not in names]
    if missing:
        listed = ", ".join(repr(name) for name in missing)
        raise DataError(f"{source}: missing column {listed}; columns present: {names}; {expected}")
    wanted = [name for name in (*optional, *required) if name in names]
    return data.with_format(None, columns=wanted)[:]


def _check_rows(columns: Columns, fields: list[str], source: str) -> str:
    """Check every value of `fields` and that all rows share one format; return it ("standard"/"conversational")."""
    problems = Problems(source)
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


def _row_format(row: int, values: dict[str, Any], problems: Problems) -> str | None:
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
    problems = Problems(source)
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
    problems = Problems(source)
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


def _render_prompts(prompts: list, first_row: int, tokenizer, problems: Problems) -> list[str | None]:
    """Render conversational prompts with the chat template; None for a prompt the template rejects (recorded)."""
    try:
        return tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template may raise anything for some conversation: render row by row to name it
        return [_render_prompt(prompt, row, tokenizer, problems) for row, prompt in enumerate(prompts, first_row)]


def _render_prompt(prompt: list, row: int, tokenizer, problems: Problems) -> str | None:
    try:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # the template's own message (e.g. from raise_exception) is the useful report
        problems.add_row(row, "prompt", f"is rejected by the tokenizer's chat template: {error}")
        return None


def _with_columns_first(data: Dataset, updates: Columns) -> Dataset:
    """`data` with the `updates` columns placed first (replacing any of the same name)."""
    kept = [name for name in data.column_names if name not in updates]
    if not kept:
        return Dataset.from_dict(updates)
    # Flattening in memory first stops concatenate_datasets writing a cache file into a save_to_disk folder.
    rest = data.select_columns(kept).flatten_indices(keep_in_memory=True)
    return concatenate_datasets([Dataset.from_dict(updates), rest], axis=1)
