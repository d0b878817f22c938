"""Tests for klalign.data: every accepted format loads, every kind of bad data raises a DataError naming it."""

import json

import pytest
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from klalign.data.datasets import (
    load_preference_dataset,
    load_prompt_dataset,
    validate_preference_dataset,
    validate_prompt_dataset,
)
from klalign.errors import DataError


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


STANDARD_ROWS = [
    {"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green.", "source": "a"},
    {"prompt": "Where is the sun?", "chosen": "In the sky.", "rejected": "In the sea.", "source": "b"},
]
CONVERSATIONAL_ROWS = [
    {"prompt": user("What colour is the sky?"), "chosen": assistant("Blue."), "rejected": assistant("Green.")},
    {"prompt": user("Where is the sun?"), "chosen": assistant("In the sky."), "rejected": assistant("In the sea.")},
]
IMPLICIT_ROWS = [
    {"chosen": user("Sky?") + assistant("Blue."), "rejected": user("Sky?") + assistant("Green.")},
    {"chosen": user("Sun?") + assistant("Up."), "rejected": user("Sun?") + assistant("Down.")},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def raises_data_error(load, path, *substrings, **kwargs):
    """Call `load(path)` expecting a DataError whose message names the file and contains every substring."""
    with pytest.raises(DataError) as caught:
        load(path, **kwargs)
    message = str(caught.value)
    for expected in (path.name, *substrings):
        assert expected in message, f"{expected!r} not in:\n{message}"
    return message


# ---------------------------------------------------------------------------------------------------------------
# Good data


def test_standard_jsonl_keeps_extra_columns(tmp_path):
    dataset = load_preference_dataset(write_jsonl(tmp_path / "train.jsonl", STANDARD_ROWS))
    assert dataset.num_rows == 2
    assert dataset[1] == STANDARD_ROWS[1]


def test_conversational_json_array(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(CONVERSATIONAL_ROWS))
    assert load_preference_dataset(path).to_list() == CONVERSATIONAL_ROWS


def test_json_file_holding_json_lines(tmp_path):
    dataset = load_preference_dataset(write_jsonl(tmp_path / "train.json", STANDARD_ROWS))
    assert dataset["chosen"] == ["Blue.", "In the sky."]


def test_implicit_conversational_prompt_is_extracted(tmp_path):
    dataset = load_preference_dataset(write_jsonl(tmp_path / "implicit.jsonl", IMPLICIT_ROWS))
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    assert dataset[0] == {"prompt": user("Sky?"), "chosen": assistant("Blue."), "rejected": assistant("Green.")}


def test_implicit_standard_prompt_is_extracted(tmp_path):
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    dataset = load_preference_dataset(write_jsonl(tmp_path / "implicit.jsonl", rows))
    assert dataset[0] == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}


def test_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    Dataset.from_list(CONVERSATIONAL_ROWS).to_parquet(path)
    assert load_preference_dataset(path).to_list() == CONVERSATIONAL_ROWS


def test_csv(tmp_path):
    path = tmp_path / "train.csv"
    Dataset.from_list(STANDARD_ROWS).to_csv(path, index=False)
    assert load_preference_dataset(path).to_list() == STANDARD_ROWS


def test_save_to_disk_dataset_and_dataset_dict_split(tmp_path):
    Dataset.from_list(STANDARD_ROWS).save_to_disk(tmp_path / "single")
    assert load_preference_dataset(tmp_path / "single").num_rows == 2
    splits = DatasetDict({"train": Dataset.from_list(STANDARD_ROWS), "test": Dataset.from_list(IMPLICIT_ROWS)})
    splits.save_to_disk(tmp_path / "splits")
    assert load_preference_dataset(tmp_path / "splits", split="test")["prompt"] == [user("Sky?"), user("Sun?")]


def test_implicit_prompt_in_saved_folder_keeps_extra_columns_and_leaves_folder_alone(tmp_path):
    folder = tmp_path / "saved"
    Dataset.from_list([{**row, "id": i} for i, row in enumerate(IMPLICIT_ROWS)]).save_to_disk(folder)
    before = sorted(path.name for path in folder.iterdir())
    dataset = load_preference_dataset(folder)
    assert dataset.column_names == ["prompt", "chosen", "rejected", "id"]
    assert dataset[1] == {"prompt": user("Sun?"), "chosen": assistant("Up."), "rejected": assistant("Down."), "id": 1}
    assert sorted(path.name for path in folder.iterdir()) == before


def test_prompt_only_formats(tmp_path):
    strings = load_prompt_dataset(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi", "id": 1}]))
    assert strings.to_list() == [{"prompt": "Hi", "id": 1}]
    Dataset.from_dict({"prompt": [user("Hi"), user("Bye")]}).to_parquet(tmp_path / "prompts.parquet")
    assert load_prompt_dataset(tmp_path / "prompts.parquet")["prompt"] == [user("Hi"), user("Bye")]


def test_validate_in_memory_datasets():
    dataset = Dataset.from_list(STANDARD_ROWS)
    assert validate_preference_dataset(dataset, "train_dataset") is dataset
    assert validate_preference_dataset(Dataset.from_list(IMPLICIT_ROWS), "eval")["prompt"][1] == user("Sun?")
    assert validate_prompt_dataset(dataset, "prompts") is dataset
    with pytest.raises(DataError, match=r"(?s)train_dataset: .*row 1, field 'chosen': is missing"):
        validate_preference_dataset(Dataset.from_list(with_row_1("chosen", None, STANDARD_ROWS)), "train_dataset")
    with pytest.raises(TypeError, match="single split"):
        validate_prompt_dataset(DatasetDict({"train": dataset}), "prompts")


# ---------------------------------------------------------------------------------------------------------------
# Bad files


def test_missing_path_names_it_and_the_accepted_formats(tmp_path):
    raises_data_error(load_preference_dataset, tmp_path / "nowhere.jsonl", "no such file", ".jsonl", "save_to_disk")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello")
    raises_data_error(load_preference_dataset, path, "unsupported file type '.txt'", ".parquet")


def test_bad_json_line_names_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(STANDARD_ROWS[0]) + "\n{not json\n\n[1, 2]\n")
    raises_data_error(load_preference_dataset, path, "line 2: invalid JSON", "line 4: expected a JSON object")


def test_bad_json_array(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"prompt": "a",\n "chosen": }]')
    raises_data_error(load_preference_dataset, path, "invalid JSON at line 2")
    path.write_text(json.dumps([STANDARD_ROWS[0], "oops"]))
    raises_data_error(load_preference_dataset, path, "row 1: expected a JSON object")
    path.write_text(json.dumps({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}))
    raises_data_error(load_preference_dataset, path, "expected a JSON array")


def test_file_that_is_not_utf8_text(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xff\xfe\x00binary")
    raises_data_error(load_preference_dataset, path, "not UTF-8 text")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")
    raises_data_error(load_preference_dataset, path, "not a readable Parquet file")


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    folder = tmp_path / "loose_files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", STANDARD_ROWS)
    raises_data_error(load_preference_dataset, folder, "save_to_disk")


def test_missing_split(tmp_path):
    DatasetDict({"train": Dataset.from_list(STANDARD_ROWS)}).save_to_disk(tmp_path / "splits")
    raises_data_error(load_preference_dataset, tmp_path / "splits", "no split 'test'", "['train']", split="test")


def test_malformed_csv_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\na,b,c,d\n")
    raises_data_error(load_preference_dataset, path, "line 3", "more values than the header")


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("empty.json", "[]"), ("empty.csv", "prompt\n")])
def test_empty_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    raises_data_error(load_prompt_dataset, path, "no rows")


def test_missing_column_lists_the_columns_present(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "chosen": "b"}])
    raises_data_error(load_preference_dataset, path, "missing column 'rejected'", "['prompt', 'chosen']")
    raises_data_error(load_prompt_dataset, write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}]), "'prompt'", "['text']")


# ---------------------------------------------------------------------------------------------------------------
# Bad rows: row 0 is fine, row 1 has the problem in `field`


def with_row_1(field, value, rows=CONVERSATIONAL_ROWS):
    bad = dict(rows[1])
    bad[field] = value
    return [rows[0], bad]


BAD_ROWS = {
    "empty string": (with_row_1("chosen", "", STANDARD_ROWS), "chosen", "empty string"),
    "whitespace": (with_row_1("prompt", " \n", STANDARD_ROWS), "prompt", "empty string"),
    "null": (with_row_1("rejected", None, STANDARD_ROWS), "rejected", "missing (null)"),
    "absent key": ([STANDARD_ROWS[0], {"prompt": "a", "chosen": "b"}], "rejected", "missing (null)"),
    "number": (with_row_1("prompt", 42, STANDARD_ROWS), "prompt", "got int 42"),
    "list of strings": (with_row_1("chosen", ["Blue."], STANDARD_ROWS), "chosen", "message 0 is str"),
    "empty messages": (with_row_1("chosen", []), "chosen", "empty list of messages"),
    "single message": (with_row_1("prompt", {"role": "user", "content": "Hi"}), "prompt", "single object"),
    "no role": (with_row_1("prompt", [{"content": "Hi"}]), "prompt", "message 0 has no 'role'"),
    "no content": (with_row_1("rejected", [{"role": "assistant"}]), "rejected", "message 0 has no 'content'"),
    "number content": (with_row_1("chosen", [{"role": "assistant", "content": 7}]), "chosen", "content of type int"),
    "empty content": (with_row_1("prompt", user("Hi") + user(" ")), "prompt", "message 1 has empty content"),
    "unknown role": (with_row_1("prompt", [{"role": "bot", "content": "Hi"}]), "prompt", "unknown role 'bot'"),
    "mixed rows": ([STANDARD_ROWS[0], CONVERSATIONAL_ROWS[1]], "prompt", "but row 0 is a string"),
    "mixed fields": (with_row_1("prompt", "Where is the sun?"), "chosen", "but field 'prompt' is a string"),
}


@pytest.mark.parametrize("rows, field, problem", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_row_names_file_row_and_field(tmp_path, rows, field, problem):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    raises_data_error(load_preference_dataset, path, f"row 1, field '{field}': ", problem)


def test_bad_prompt_only_row_in_parquet(tmp_path):
    path = tmp_path / "prompts.parquet"
    Dataset.from_dict({"prompt": ["Hi", None, "Bye"]}).to_parquet(path)
    raises_data_error(load_prompt_dataset, path, "row 1, field 'prompt': is missing")


def test_implicit_prompt_without_shared_start(tmp_path):
    unrelated = {"chosen": user("Sky?") + assistant("Blue."), "rejected": user("Sea?") + assistant("Wet.")}
    path = write_jsonl(tmp_path / "implicit.jsonl", [IMPLICIT_ROWS[0], unrelated])
    raises_data_error(load_preference_dataset, path, "row 1, field 'prompt'", "do not start alike")


def test_reports_the_first_five_offending_rows_and_counts_the_rest(tmp_path):
    rows = [{"prompt": "" if i % 2 else "ok", "chosen": "a", "rejected": "b"} for i in range(20)]
    message = raises_data_error(load_preference_dataset, write_jsonl(tmp_path / "train.jsonl", rows), "10 found")
    assert [f"row {i}," in message for i in (1, 3, 5, 7, 9, 11)] == [True] * 5 + [False]
    assert "... and 5 more" in message


# ---------------------------------------------------------------------------------------------------------------
# Prompt lengths


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "<{{ m['role'] }}> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def word_tokenizer(chat_template=None):
    """A word-level tokenizer built in-process: one token per whitespace-separated word, so lengths are obvious."""
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=chat_template)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(CHAT_TEMPLATE)


def test_standard_prompt_too_long(tmp_path, tokenizer):
    rows = [{"prompt": prompt, "chosen": "a", "rejected": "b"} for prompt in ("one two", "one two three")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert load_preference_dataset(path, tokenizer=tokenizer, max_length=4).num_rows == 2
    expected = ("row 1, field 'prompt': is 3 tokens", "max_length=3")
    message = raises_data_error(load_preference_dataset, path, *expected, tokenizer=tokenizer, max_length=3)
    assert "row 0" not in message


def test_conversational_prompt_length_counts_the_chat_template(tmp_path, tokenizer):
    rows = [{"prompt": user("hi")}, {"prompt": user("one two three")}]  # "<user> ... <assistant>": 3 and 5 tokens
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    assert load_prompt_dataset(path, tokenizer=tokenizer, max_length=6).num_rows == 2
    expected = ("row 1, field 'prompt': is 5 tokens", "max_length=5")
    raises_data_error(load_prompt_dataset, path, *expected, tokenizer=tokenizer, max_length=5)


def test_implicit_prompt_length_uses_the_extracted_prompt(tokenizer):
    dataset = Dataset.from_list(IMPLICIT_ROWS)  # extracted prompts render as "<user> Sky? <assistant>": 3 tokens
    assert validate_preference_dataset(dataset, "train_dataset", tokenizer=tokenizer, max_length=4).num_rows == 2
    with pytest.raises(DataError, match=r"(?s)train_dataset: .*row 0, field 'prompt': is 3 tokens"):
        validate_preference_dataset(dataset, "train_dataset", tokenizer=tokenizer, max_length=3)


def test_prompt_rejected_by_the_chat_template(tmp_path, tokenizer):
    rows = [{"prompt": user("hi")}, {"prompt": [{"role": "system", "content": "Be terse."}] + user("hi")}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    expected = ("row 1, field 'prompt'", "chat template", "no system role")
    message = raises_data_error(load_prompt_dataset, path, *expected, tokenizer=tokenizer, max_length=64)
    assert "row 0" not in message


def test_conversational_prompts_need_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": user("hi")}])
    raises_data_error(load_prompt_dataset, path, "no chat template", tokenizer=word_tokenizer(), max_length=8)


def test_max_length_without_tokenizer_is_a_caller_error(tmp_path):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_prompt_dataset(tmp_path / "whatever.jsonl", max_length=8)
