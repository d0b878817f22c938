"""Sampling from the geometric mixture of two causal LMs, token by token (Nash-MD's opponent).

Nash-MD (Munos et al. 2023, "Nash Learning from Human Feedback", section 6) plays against
`mu ∝ pi^(1 - alpha) * pi_ref^alpha` with `alpha = eta * beta`. For a sequence model that product is
not tractable, so, like TRL's former `GeometricMixtureWrapper`, the mixture is taken per token: at
each step the next-token log-probs of both models are mixed,
`log mu(y_t | x, y_<t) = (1 - alpha) log pi(y_t | .) + alpha log pi_ref(y_t | .) - log Z_t`,
and the token is drawn from that. On a single-token task (the test bed) this is the exact mixture.

Both models keep their own KV cache, so a step costs one incremental forward of each. The two
"models" are callables taking HF forward keyword arguments, so the reference can be a separate
model or the same weights with a LoRA adapter disabled.
"""

from __future__ import annotations

from typing import Callable

import torch

from klalign.data.prompts import prompt_token_ids
from klalign.generation.hf import strip_after_stop as _strip
from klalign.generation.types import Completion
from klalign.ops.batching import left_padded as _left_padded


def mixture_logprobs(policy_logits: torch.Tensor, reference_logits: torch.Tensor, mixture_coef: float) -> torch.Tensor:
    """log mu over the vocabulary from two rows of next-token logits. (B, V), (B, V) -> (B, V)"""
    mixed = (1 - mixture_coef) * torch.log_softmax(policy_logits.float(), -1) + mixture_coef * torch.log_softmax(
        reference_logits.float(), -1
    )
    return torch.log_softmax(mixed, -1)  # renormalise: the geometric mixture's log Z_t


@torch.no_grad()
def sample_geometric_mixture(
    policy: Callable,
    reference: Callable,
    tokenizer,
    prompts: list,
    num_samples: int,
    mixture_coef: float,
    max_new_tokens: int,
    batch_size: int = 32,
    device=None,
    synced: bool = False,
    stop_ids: list[int] | None = None,
) -> list[list[Completion]]:
    """`num_samples` completions per prompt drawn from the token-level geometric mixture.

    `policy(**kwargs)` and `reference(**kwargs)` run a causal LM forward (input_ids, attention_mask,
    position_ids, past_key_values, use_cache, logits_to_keep) and return its output. `mixture_coef`
    is alpha, the reference's weight (0: the policy itself, 1: the reference). `synced`: always run
    `max_new_tokens` steps, as every process must call a ZeRO-3-sharded model equally often.
    `stop_ids`: the tokens that end a response (default: the tokenizer's EOS; see
    `klalign.generation.hf.stop_token_ids`).
    """
    if not 0.0 <= mixture_coef <= 1.0:
        raise ValueError(f"mixture_coef must be in [0, 1], got {mixture_coef}")
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    flat = [(p, i) for p, i in zip(prompts, ids) for _ in range(num_samples)]  # a prompt's samples are contiguous
    pad_id = tokenizer.pad_token_id
    stop_ids = stop_ids or [tokenizer.eos_token_id]
    done: list[Completion] = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        new = _sample_batch(policy, reference, [i for _, i in chunk], mixture_coef, max_new_tokens, pad_id, stop_ids,
                            device, synced)
        for (prompt, prompt_ids), generated in zip(chunk, new):
            completion_ids = _strip(generated, stop_ids)
            text = tokenizer.decode(completion_ids, skip_special_tokens=True)
            done.append(Completion(prompt, prompt_ids, completion_ids, text))
    return [done[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def _sample_batch(
    policy, reference, rows, mixture_coef, max_new_tokens, pad_id, stop_ids, device, synced
) -> list[list[int]]:
    """One left-padded batch of prompts, generated to EOS or `max_new_tokens`."""
    enc = _left_padded(rows, pad_id, device)
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]  # (B, L)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each prompt
    caches = [None, None]
    finished = torch.zeros(len(rows), dtype=torch.bool, device=input_ids.device)
    stops = torch.tensor(stop_ids, device=input_ids.device)
    generated = []
    for _ in range(max_new_tokens):
        logits = []
        for j, forward in enumerate((policy, reference)):
            out = forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=caches[j], use_cache=True, logits_to_keep=1)
            caches[j] = out.past_key_values
            logits.append(out.logits[:, -1])  # (B, V)
        probs = mixture_logprobs(logits[0], logits[1], mixture_coef).exp()  # (B, V)
        token = torch.multinomial(probs, 1).squeeze(1)  # (B,)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        generated.append(token)
        finished |= torch.isin(token, stops)
        if finished.all() and not synced:
            break
        # Only the new token goes in next: both caches hold the prefix.
        input_ids = token[:, None]  # (B, 1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(input_ids)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return torch.stack(generated, dim=1).tolist()  # (B, new)
