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

With `sampler_logprobs`, each sampled token's log-prob under the processed (tempered, top-p) law it was
drawn from is recorded during generation (`SampledTokenLogprobs`), one step's scores (B, V) at a time,
never `output_scores`' (B, T, V). At temperature 1 and top_p 1 no warper runs and the recorder sees the
model's raw logits (in float32, as `generate` casts them): the log-probs are the model's own
(`Completion.sampler_is_model`), and a caller that needs them need not recompute them (issue 22, item 2).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

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


class SampledTokenLogprobs(LogitsProcessor):
    """Records log q(token) of each sampled token under the processed scores it was sampled from, keeping one
    step's scores (B, V) at a time instead of `output_scores`' every step (B, T, V).

    Called at each decoding step with the scores about to be sampled from; at the next call the token that
    was sampled is the last column of `input_ids`, and its log-prob is taken from the kept row. `finish`
    takes the last step's from the returned sequences. It must be the last processor (see
    `recording_sampled_logprobs`): what it sees is what `generate` samples from."""

    def __init__(self):
        self.kept: torch.Tensor | None = None  # (b, V) the last step's processed scores
        self.logprobs: list[torch.Tensor] = []  # (b,) per step whose token is known

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.kept is not None:
            self.logprobs.append(_token_logprob(self.kept, input_ids[:, -1]))
        self.kept = scores
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(b, new) log-probs of the generated tokens `new_tokens` (b, new): the last one's from the kept row.
        (A generate that ran steps past the stop and dropped them, as on MPS, recorded more: cut to `new`.)"""
        n = new_tokens.size(1)
        if len(self.logprobs) == n - 1:
            self.logprobs.append(_token_logprob(self.kept, new_tokens[:, -1]))
        self.kept = None
        if len(self.logprobs) < n:
            raise RuntimeError(f"recorded {len(self.logprobs)} sampled-token log-probs for {n} generated tokens")
        return torch.stack(self.logprobs[:n], dim=1)


def _token_logprob(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(scores)[token] per row. (b, V), (b,) -> (b,)"""
    return torch.log_softmax(scores.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def recording_sampled_logprobs(config: GenerationConfig) -> tuple[GenerationConfig, LogitsProcessorList,
                                                                   SampledTokenLogprobs]:
    """`config` with its temperature and top_p moved into explicit warpers followed by a recorder of the
    sampled tokens' log-probs: (config, the processors to pass to `generate`, the recorder).

    transformers (5.19, `_get_logits_processor`) puts a caller's `logits_processor` list *before* its own
    sampling warpers (temperature, top_k, top_p, min_p, ...), so a recorder passed as it is would see the
    scores before temperature and top_p. Here those warpers are the caller's, in generate's order, and the
    config's are neutral (temperature 1, top_p 1, min_p unset: generate adds none), so the recorder is the
    last processor wherever transformers places the list, and the law sampled from is unchanged."""
    warpers = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    recorder = SampledTokenLogprobs()
    config = copy.deepcopy(config)
    config.temperature, config.top_p, config.min_p = 1.0, 1.0, None  # min_p 0 was a no-op warper after top_p
    return config, LogitsProcessorList([*warpers, recorder]), recorder


def prefilled_prompts(model, enc: dict[str, torch.Tensor], num_samples: int):
    """The KV cache of each prompt's tokens but the last, computed once and repeated over its `num_samples`
    contiguous rows of `enc` (left-padded, (k n, L)): `generate` given it runs only the last prompt token,
    so a prompt is prefilled once, not n times (issue 22, item 1; transformers' documented prefix caching).
    Positions as `generate` derives them from the mask, so the cache is the one it would have built."""
    ids, mask = enc["input_ids"][::num_samples, :-1], enc["attention_mask"][::num_samples, :-1]  # (k, L-1)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(num_samples)
    return cache


@torch.no_grad()
def hf_sample(model, tokenizer, prompts: list, num_samples: int, args: GenerationArguments, accelerator=None,
              progress: bool = True, sampler_logprobs: bool = False) -> list[Completion]:
    """`num_samples` completions of each prompt with `generate`, a prompt's samples contiguous, in prompt order."""
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    flat = [(p, i) for p, i in zip(prompts, ids) for _ in range(num_samples)]
    pad_id = tokenizer.pad_token_id
    done: list[Completion] = []
    own_law = args.temperature == 1.0 and args.top_p == 1.0  # the recorder sees the raw logits (Completion)
    with gathered_for_generation(model, accelerator) as unwrapped:
        stop_ids = stop_token_ids(unwrapped, tokenizer)
        config = sampling_config(args, stop_ids, pad_id)
        was_training = unwrapped.training
        unwrapped.eval()
        device = next(unwrapped.parameters()).device
        starts = range(0, len(flat), args.generation_batch_size)
        # Each call holds whole groups of a prompt's samples: prefill each prompt once (`prefilled_prompts`).
        shared = num_samples > 1 and args.generation_batch_size % num_samples == 0 and min(map(len, ids)) > 1
        with without_checkpoint_defaults(unwrapped):
            for start in tqdm(starts, desc="generating", disable=not progress, leave=False):
                chunk = flat[start : start + args.generation_batch_size]
                enc = left_padded([i for _, i in chunk], pad_id, device)
                if shared:
                    enc["past_key_values"] = prefilled_prompts(unwrapped, enc, num_samples)
                if sampler_logprobs:  # a fresh recorder per call
                    recording, processors, recorder = recording_sampled_logprobs(config)
                    sequences = unwrapped.generate(**enc, generation_config=recording, logits_processor=processors)
                else:
                    sequences = unwrapped.generate(**enc, generation_config=config)
                new = sequences[:, enc["input_ids"].size(1) :]  # (b, new); sequences are left-padded
                step_logps = recorder.finish(new).tolist() if sampler_logprobs else None
                for j, ((prompt, prompt_ids), generated) in enumerate(zip(chunk, new.tolist())):
                    completion_ids = strip_after_stop(generated, stop_ids)
                    text = tokenizer.decode(completion_ids, skip_special_tokens=True)
                    logps = None if step_logps is None else step_logps[j][: len(completion_ids)]
                    done.append(Completion(prompt, prompt_ids, completion_ids, text, logps,
                                           sampler_is_model=own_law and logps is not None))
        unwrapped.train(was_training)
    return done
