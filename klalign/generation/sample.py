"""One sampling call for every backend: `sample_completions` (HF `generate`, or a colocated vLLM engine).

Prompts are strings (used as they are) or conversations (rendered with the tokenizer's chat template and
its generation prompt). `sample_completions` keeps the token ids it generated, so log-probs are computed
on exactly the sampled tokens (decoding then re-encoding text can change them). Every backend samples
on-policy by construction (`klalign.generation.hf`, `klalign.generation.vllm_engine`).
"""

from __future__ import annotations

import torch

from klalign.generation.hf import hf_sample
from klalign.generation.types import Completion, GenerationArguments


def sample_completions(
    model,
    tokenizer,
    prompts: list,
    num_samples: int = 1,
    args: GenerationArguments | None = None,
    seed: int | None = None,
    accelerator=None,
    progress: bool = True,
    engine=None,
    weights_key=None,
    sampler_logprobs: bool = False,
) -> list[list[Completion]]:
    """`num_samples` sampled completions for each prompt: one list per prompt, in prompt order.

    `engine`: a `klalign.generation.vllm_engine.VLLMEngine` to sample with instead of HF `generate`; `model`'s
    weights are pushed into it first unless the ones under `weights_key` are there already. vLLM always
    reports the sampled tokens' log-probs; HF does with `sampler_logprobs` (from the processed scores).
    Every completion carries `weights_key` (`Completion.weights_key`): a caller can tell later whether the
    weights that drew it are the ones it scores with.
    """
    args = args or GenerationArguments()
    if seed is not None:
        torch.manual_seed(seed)
    if engine is not None:
        from klalign.generation.vllm_engine import sample_with_engine

        samples = sample_with_engine(engine, model, tokenizer, prompts, num_samples, args, weights_key)
    else:
        done = hf_sample(model, tokenizer, prompts, num_samples, args, accelerator, progress, sampler_logprobs)
        samples = [done[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
    for per_prompt in samples:
        for completion in per_prompt:
            completion.weights_key = weights_key
    return samples


def generate_responses(
    model, tokenizer, prompts: list, num_samples: int = 1, args: GenerationArguments | None = None,
    generator_seed: int | None = None, accelerator=None, progress: bool = True,
) -> list[list[str]]:
    """Like `sample_completions`, text only: a list (one per prompt) of `num_samples` strings."""
    samples = sample_completions(model, tokenizer, prompts, num_samples, args, generator_seed, accelerator, progress)
    return [[c.text for c in per_prompt] for per_prompt in samples]
