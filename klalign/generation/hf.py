"""The HF backend: batched sampling of n responses per prompt with transformers' `generate` (KV cache on).

Works on a plain model, a PEFT model, and a model wrapped by accelerate for DDP or DeepSpeed (ZeRO-3
parameters are gathered for the duration of the call, as TRL's `unwrap_model_for_generation` does).

On-policy by construction: a checkpoint's `generation_config.json` may carry sampling defaults
(repetition_penalty, min_p, typical_p, no_repeat_ngram_size, min_new_tokens, ...) that transformers
merges into every `generate` call whose arguments leave them unset. Samples drawn with them are
not from pi, so every KL estimate and policy gradient computed on them would be silently biased.
Generation here runs with the model's own defaults swapped for a blank `GenerationConfig` and an
explicit one (`sampling_config`) in which every processor but temperature and top_p is neutral.
Only the checkpoint's stop tokens are kept (many instruct models have two).
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from klalign.data.prompts import prompt_token_ids
from klalign.generation.types import Completion, GenerationArguments
from klalign.models.placement import gathered_for_generation
from klalign.ops.batching import left_padded
from klalign.ops.modules import base_model


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the checkpoint's `generation_config.eos_token_id` (an id or a list)
    and the tokenizer's EOS, in that order, without repeats."""
    configured = getattr(getattr(base_model(model), "generation_config", None), "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    ids = configured + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return list(dict.fromkeys(ids))


def sampling_config(args: GenerationArguments, stop_ids: list[int], pad_id: int) -> GenerationConfig:
    """Pure ancestral sampling from pi at `args.temperature` and `args.top_p`: every other logits
    processor of `generate` is set to its neutral value explicitly. (min_length / min_new_tokens stay
    unset: with the blank model config of `without_checkpoint_defaults` they default to no constraint,
    and setting both makes transformers warn at every call.)"""
    return GenerationConfig(
        do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0, min_p=0.0, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
        max_new_tokens=args.max_new_tokens, num_beams=1, num_return_sequences=1, renormalize_logits=False,
        remove_invalid_values=False, eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True,
    )


@contextlib.contextmanager
def without_checkpoint_defaults(model):
    """Run `generate` with the checkpoint's generation defaults replaced by a blank config.

    transformers fills every field a call leaves unset from `model.generation_config` (the
    checkpoint's `generation_config.json`); with a blank one only transformers' global defaults remain,
    and `sampling_config` sets each of those that could change the sampled law.
    """
    base = base_model(model)
    saved = base.generation_config
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


def strip_after_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """Cut a generated row after its first stop token (kept). Everything before it was sampled, pad
    ids included (a pad id distinct from EOS is an ordinary token); only what `generate` wrote after
    the stop (padding) goes. A row without a stop token ran to max_new_tokens and is kept whole."""
    stops = set(stop_ids)
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1]
    return ids


def _sampled_logprobs(scores: tuple, tokens: torch.Tensor) -> torch.Tensor:
    """log q(token) under the processed scores `generate` sampled from, step by step. (b, new)"""
    return torch.stack([torch.log_softmax(step.float(), dim=-1).gather(-1, tokens[:, t : t + 1]).squeeze(-1)
                        for t, step in enumerate(scores)], dim=1)


@torch.no_grad()
def hf_sample(model, tokenizer, prompts: list, num_samples: int, args: GenerationArguments, accelerator=None,
              progress: bool = True, sampler_logprobs: bool = False) -> list[Completion]:
    """`num_samples` completions of each prompt with `generate`, a prompt's samples contiguous, in prompt order."""
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    flat = [(p, i) for p, i in zip(prompts, ids) for _ in range(num_samples)]
    pad_id = tokenizer.pad_token_id
    done: list[Completion] = []
    with gathered_for_generation(model, accelerator) as unwrapped:
        stop_ids = stop_token_ids(unwrapped, tokenizer)
        config = sampling_config(args, stop_ids, pad_id)
        config.output_scores = config.return_dict_in_generate = sampler_logprobs  # in the config: no kwargs beside it
        was_training = unwrapped.training
        unwrapped.eval()
        device = next(unwrapped.parameters()).device
        starts = range(0, len(flat), args.generation_batch_size)
        with without_checkpoint_defaults(unwrapped):
            for start in tqdm(starts, desc="generating", disable=not progress, leave=False):
                chunk = flat[start : start + args.generation_batch_size]
                enc = left_padded([i for _, i in chunk], pad_id, device)
                out = unwrapped.generate(**enc, generation_config=config)
                sequences = out.sequences if sampler_logprobs else out  # (b, prompt_len + new), left-padded
                new = sequences[:, enc["input_ids"].size(1) :]  # (b, new)
                step_logps = _sampled_logprobs(out.scores, new).tolist() if sampler_logprobs else None
                for j, ((prompt, prompt_ids), generated) in enumerate(zip(chunk, new.tolist())):
                    completion_ids = strip_after_stop(generated, stop_ids)
                    text = tokenizer.decode(completion_ids, skip_special_tokens=True)
                    logps = None if step_logps is None else step_logps[j][: len(completion_ids)]
                    done.append(Completion(prompt, prompt_ids, completion_ids, text, logps))
        unwrapped.train(was_training)
    return done
