"""Prompts, in one place: their identity, how they are stored, tokenized and shown as text.

A prompt is a string (used as it is) or a conversation (a list of `{"role", "content"}` messages,
rendered with the tokenizer's chat template), TRL's two formats.

- `prompt_key` is a prompt's identity: canonical JSON (sorted keys), the same for equal prompts in
  every process and run. Per-prompt seeds, resume bookkeeping and the feedback store use it.
- The feedback store keeps a prompt as its key (`stored_prompt`) and reads it back with
  `restored_prompt`, for every trainer: one schema. Stores written before this schema held plain
  strings for string prompts (iterative DPO, Nash); reading one back fails with a message naming it.
"""

from __future__ import annotations

import json

from klalign.errors import DataError


def prompt_key(prompt) -> str:
    """A prompt's identity: canonical JSON of the string or conversation."""
    return json.dumps(prompt, sort_keys=True)


def stored_prompt(prompt) -> str:
    """How the feedback store keeps a prompt (its key: JSON, read back by `restored_prompt`)."""
    return prompt_key(prompt)


def restored_prompt(stored: str, where: str = "a stored row"):
    """The prompt a `stored_prompt` string holds; a string that is not one (a store from an older klalign
    that kept string prompts as plain text) is refused, naming `where`."""
    try:
        prompt = json.loads(stored)
    except (TypeError, json.JSONDecodeError):
        prompt = None
    if not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: prompt {str(stored)[:80]!r} is not in the feedback store's prompt format (JSON of "
                        "the prompt, klalign.data.prompts.stored_prompt); the store was written by an older klalign. "
                        "Start a new output_dir (or feedback_dir) for this run")
    return prompt


def prompt_text(prompt) -> str:
    """A prompt as plain text for a judge: the string, or a conversation's last message."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def conversation_text(prompt) -> str:
    """A prompt as plain text for a text encoder: the string, or every message's content, one a line."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def with_response(tokenizer, prompt, response: str) -> str:
    """A prompt followed by a response, as a reward model reads it: concatenated for a string prompt, or
    the conversation through the tokenizer's chat template with the response as the assistant turn."""
    if isinstance(prompt, str):
        return prompt + response
    return tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)


def as_turn(prompt, response: str):
    """A response in the prompt's format: a string, or an assistant message list for conversations
    (TRL's conversational preference format)."""
    return response if isinstance(prompt, str) else [{"role": "assistant", "content": response}]


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """A prompt's ids as TRL's trainers tokenize it: strings with the tokenizer's special tokens
    (e.g. BOS), conversations through the chat template with the generation prompt."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(ids["input_ids"])
