"""Batched sampling of n responses per prompt with HF `generate` (KV cache on).

Prompts are strings (used as they are) or conversations (rendered with the tokenizer's chat
template and its generation prompt). Works on a plain model, a PEFT model, and a model wrapped by
accelerate for DDP or DeepSpeed (ZeRO-3 parameters are gathered for the duration of the call,
as TRL's `unwrap_model_for_generation` does).
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


def render_prompts(tokenizer, prompts: list) -> list[str]:
    """Conversations through the chat template (with the generation prompt); strings unchanged."""
    return [
        p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def _gathered_for_generation(model, accelerator):
    """Unwrap DDP/DeepSpeed; under ZeRO-3 gather the sharded parameters while generating."""
    if accelerator is None:
        return contextlib.nullcontext(model)
    from trl.models import unwrap_model_for_generation

    return unwrap_model_for_generation(model, accelerator)


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list,
    num_samples: int = 1,
    args: GenerationArguments | None = None,
    generator_seed: int | None = None,
    accelerator=None,
    progress: bool = True,
) -> list[list[str]]:
    """`num_samples` sampled responses for each prompt: a list (one per prompt) of lists of strings.

    The special tokens (EOS, padding) are stripped; a response stops at EOS or `max_new_tokens`.
    """
    args = args or GenerationArguments()
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    texts = render_prompts(tokenizer, prompts)
    flat = [t for t in texts for _ in range(num_samples)]  # prompt i's samples are contiguous
    outputs: list[str] = []
    with _gathered_for_generation(model, accelerator) as unwrapped:
        was_training = unwrapped.training
        unwrapped.eval()
        device = next(unwrapped.parameters()).device
        batches = range(0, len(flat), args.generation_batch_size)
        for start in tqdm(batches, desc="generating", disable=not progress, leave=False):
            chunk = flat[start : start + args.generation_batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = unwrapped.generate(
                **enc,
                do_sample=True,
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
            )  # (b, prompt_len + new)
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].size(1) :], skip_special_tokens=True)
        unwrapped.train(was_training)
    return [outputs[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
