"""Batched sampling of n responses per prompt with HF `generate` (KV cache on).

Prompts are strings (used as they are) or conversations (rendered with the tokenizer's chat
template and its generation prompt). Works on a plain model, a PEFT model, and a model wrapped by
accelerate for DDP or DeepSpeed (ZeRO-3 parameters are gathered for the duration of the call, as
TRL's `unwrap_model_for_generation` does).

`sample_completions` keeps the token ids it generated, so log-probs are computed on exactly the
sampled tokens (decoding then re-encoding text can change them).

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
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig


BACKENDS = ("hf", "vllm")
# The help of every generation setting, shared by GenerationArguments and OnlineConfig (one text each).
GENERATION_HELP = {
    "max_new_tokens": "Most tokens generated per response.",
    "temperature": "Sampling temperature (> 0).",
    "top_p": "Nucleus sampling mass in (0, 1].",
    "generation_batch_size": "Sequences per HF generate() call.",
    "generation_backend": "'hf' (transformers' generate) or 'vllm' (a colocated vLLM engine per process).",
    "vllm_gpu_memory_utilization": "vLLM on CUDA: the share of GPU memory its engine may take.",
    "vllm_kv_cache_gb": "vLLM on CPUs: the KV cache it allocates up front, in GiB.",
    "vllm_dtype": "vLLM's weights dtype: auto (the model's), float32, bfloat16 or float16.",
    "vllm_max_model_len": "vLLM's longest prompt + response in tokens (default: the model's).",
    "vllm_sleep": "vLLM on CUDA: free the engine's memory between rounds (sleep mode).",
}


def generation_field(default, name: str):
    """A dataclass field for a generation setting, with its one help text (GENERATION_HELP)."""
    return field(default=default, metadata={"help": GENERATION_HELP[name]})


@dataclass
class GenerationArguments:
    """How responses are sampled. YAML keys map 1:1 onto these fields."""

    max_new_tokens: int = generation_field(32, "max_new_tokens")
    temperature: float = generation_field(1.0, "temperature")
    top_p: float = generation_field(1.0, "top_p")
    generation_batch_size: int = generation_field(32, "generation_batch_size")
    generation_backend: str = generation_field("hf", "generation_backend")
    vllm_gpu_memory_utilization: float = generation_field(0.3, "vllm_gpu_memory_utilization")
    vllm_kv_cache_gb: float = generation_field(1.0, "vllm_kv_cache_gb")
    vllm_dtype: str = generation_field("auto", "vllm_dtype")
    vllm_max_model_len: int | None = generation_field(None, "vllm_max_model_len")
    vllm_sleep: bool = generation_field(True, "vllm_sleep")

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.generation_backend not in BACKENDS:
            raise ValueError(f"generation_backend must be one of {list(BACKENDS)}, got {self.generation_backend!r}")
        if self.generation_backend == "vllm":
            from klalign.vllm_engine import require_vllm

            require_vllm()
            if self.temperature > 2:
                raise ValueError(f"vLLM samples at temperature <= 2, got {self.temperature}")


@dataclass
class Completion:
    """One sampled response: the prompt as given, its token ids, the response's ids and text, and the
    sampler's log-probs of the sampled tokens under the sampling settings (when it reported them)."""

    prompt: object  # str or list of messages
    prompt_ids: list[int]
    completion_ids: list[int]  # the sampled tokens, EOS included when generated, no padding
    text: str  # decoded without special tokens
    sampler_logprobs: list[float] | None = None  # (len(completion_ids),): log q(y_t | x, y_<t) of the sampler


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


def gathered_for_generation(model, accelerator):
    """Unwrap DDP/DeepSpeed; under ZeRO-3 gather the sharded parameters while generating."""
    if accelerator is None:
        return contextlib.nullcontext(model)
    from trl.models import unwrap_model_for_generation

    return unwrap_model_for_generation(model, accelerator)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the checkpoint's `generation_config.eos_token_id` (an id or a list)
    and the tokenizer's EOS, in that order, without repeats."""
    configured = getattr(getattr(_base_model(model), "generation_config", None), "eos_token_id", None)
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


def _base_model(model):
    """The transformers model under a PEFT wrapper (whose `generation_config` `generate` reads)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def without_checkpoint_defaults(model):
    """Run `generate` with the checkpoint's generation defaults replaced by a blank config.

    transformers fills every field a call leaves unset from `model.generation_config` (the
    checkpoint's `generation_config.json`); with a blank one only transformers' global defaults remain,
    and `sampling_config` sets each of those that could change the sampled law.
    """
    base = _base_model(model)
    saved = base.generation_config
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


def _strip(ids: list[int], stop_ids: list[int]) -> list[int]:
    """Cut a generated row after its first stop token (kept). Everything before it was sampled, pad
    ids included (a pad id distinct from EOS is an ordinary token); only what `generate` wrote after
    the stop (padding) goes. A row without a stop token ran to max_new_tokens and is kept whole."""
    stops = set(stop_ids)
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1]
    return ids


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
    engine=None,
    weights_key=None,
    sampler_logprobs: bool = False,
) -> list[list[Completion]]:
    """`num_samples` sampled completions for each prompt: one list per prompt, in prompt order.

    `engine`: a `klalign.vllm_engine.VLLMEngine` to sample with instead of HF `generate`; `model`'s
    weights are pushed into it first unless the ones under `weights_key` are there already. vLLM always
    reports the sampled tokens' log-probs; HF does with `sampler_logprobs` (from the processed scores).
    """
    args = args or GenerationArguments()
    if seed is not None:
        torch.manual_seed(seed)
    if engine is not None:
        from klalign.vllm_engine import sample_with_engine

        return sample_with_engine(engine, model, tokenizer, prompts, num_samples, args, weights_key)
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    flat = [(p, i) for p, i in zip(prompts, ids) for _ in range(num_samples)]  # a prompt's samples are contiguous
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
                enc = _left_padded([i for _, i in chunk], pad_id, device)
                out = unwrapped.generate(**enc, generation_config=config)
                sequences = out.sequences if sampler_logprobs else out  # (b, prompt_len + new), left-padded
                new = sequences[:, enc["input_ids"].size(1) :]  # (b, new)
                step_logps = _sampled_logprobs(out.scores, new).tolist() if sampler_logprobs else None
                for j, ((prompt, prompt_ids), generated) in enumerate(zip(chunk, new.tolist())):
                    completion_ids = _strip(generated, stop_ids)
                    text = tokenizer.decode(completion_ids, skip_special_tokens=True)
                    logps = None if step_logps is None else step_logps[j][: len(completion_ids)]
                    done.append(Completion(prompt, prompt_ids, completion_ids, text, logps))
        unwrapped.train(was_training)
    return [done[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def _sampled_logprobs(scores: tuple, tokens: torch.Tensor) -> torch.Tensor:
    """log q(token) under the processed scores `generate` sampled from, step by step. (b, new)"""
    return torch.stack([torch.log_softmax(step.float(), dim=-1).gather(-1, tokens[:, t : t + 1]).squeeze(-1)
                        for t, step in enumerate(scores)], dim=1)


def generate_responses(
    model, tokenizer, prompts: list, num_samples: int = 1, args: GenerationArguments | None = None,
    generator_seed: int | None = None, accelerator=None, progress: bool = True,
) -> list[list[str]]:
    """Like `sample_completions`, text only: a list (one per prompt) of `num_samples` strings."""
    samples = sample_completions(model, tokenizer, prompts, num_samples, args, generator_seed, accelerator, progress)
    return [[c.text for c in per_prompt] for per_prompt in samples]
