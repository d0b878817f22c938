"""Batched sampling of n responses per prompt with HF `generate` (KV cache on).

Prompts are strings (used as they are) or conversations (rendered with the tokenizer's chat
template and its generation prompt). Works on a plain model, a PEFT model, and a model wrapped by
accelerate for DDP or DeepSpeed (ZeRO-3 parameters are gathered for the duration of the call, as
TRL's `unwrap_model_for_generation` does).

`sample_completions` keeps the token ids it generated, so log-probs are computed on exactly the
sampled tokens (decoding then re-encoding text can change them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


@dataclass
class GenerationArguments:
    """How responses are sampled. YAML keys map 1:1 onto these fields."""

    max_new_tokens: int = field(default=32, metadata={"help": "Most tokens generated per response."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]."})
    generation_batch_size: int = field(default=32, metadata={"help": "Sequences generated per generate() call."})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    """One sampled response: the prompt as given, its token ids, the response's ids and text."""

    prompt: object  # str or list of messages
    prompt_ids: list[int]
    completion_ids: list[int]  # the sampled tokens, EOS included when generated, no padding
    text: str  # decoded without special tokens


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """A prompt's ids as TRL's trainers tokenize it: strings with the tokenizer's special tokens
    (e.g. BOS), conversations through the chat template with the generation prompt."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(ids["input_ids"])


def _left_padded(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _gathered_for_generation(model, accelerator):
    """Unwrap DDP/DeepSpeed; under ZeRO-3 gather the sharded parameters while generating."""
    if accelerator is None:
        return contextlib.nullcontext(model)
    from trl.models import unwrap_model_for_generation

    return unwrap_model_for_generation(model, accelerator)


def _strip(ids: list[int], pad_id: int, eos_id: int) -> list[int]:
    """Cut a generated row after its first EOS (kept) and drop padding."""
    if eos_id in ids:
        ids = ids[: ids.index(eos_id) + 1]
    return [t for t in ids if t != pad_id or t == eos_id]


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: list,
    num_samples: int = 1,
    args: GenerationArguments | None = None,
    seed: int | None = None,
    accelerator=None,
    progress: bool = True,
) -> list[list[Completion]]:
    """`num_samples` sampled completions for each prompt: one list per prompt, in prompt order."""
    args = args or GenerationArguments()
    if seed is not None:
        torch.manual_seed(seed)
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    flat = [(p, i) for p, i in zip(prompts, ids) for _ in range(num_samples)]  # a prompt's samples are contiguous
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    done: list[Completion] = []
    with _gathered_for_generation(model, accelerator) as unwrapped:
        was_training = unwrapped.training
        unwrapped.eval()
        device = next(unwrapped.parameters()).device
        starts = range(0, len(flat), args.generation_batch_size)
        for start in tqdm(starts, desc="generating", disable=not progress, leave=False):
            chunk = flat[start : start + args.generation_batch_size]
            enc = _left_padded([i for _, i in chunk], pad_id, device)
            out = unwrapped.generate(
                **enc,
                do_sample=True,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=0,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                use_cache=True,
            )  # (b, prompt_len + new), prompts left-padded
            new = out[:, enc["input_ids"].size(1) :].tolist()
            for (prompt, prompt_ids), generated in zip(chunk, new):
                completion_ids = _strip(generated, pad_id, eos_id)
                text = tokenizer.decode(completion_ids, skip_special_tokens=True)
                done.append(Completion(prompt, prompt_ids, completion_ids, text))
        unwrapped.train(was_training)
    return [done[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def generate_responses(
    model, tokenizer, prompts: list, num_samples: int = 1, args: GenerationArguments | None = None,
    generator_seed: int | None = None, accelerator=None, progress: bool = True,
) -> list[list[str]]:
    """Like `sample_completions`, text only: a list (one per prompt) of `num_samples` strings."""
    samples = sample_completions(model, tokenizer, prompts, num_samples, args, generator_seed, accelerator, progress)
    return [[c.text for c in per_prompt] for per_prompt in samples]
