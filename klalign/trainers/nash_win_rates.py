"""What `NLHFTrainer` reports after every iteration: win rates of pi_{k+1} against pi_ref and against pi_k on
fresh samples, with their standard errors, and KL(pi_{k+1} || pi_ref). Their preference queries are counted
apart from training's (`eval_queries`)."""

from __future__ import annotations

import math

import numpy as np
import torch

from klalign.data.prompts import stored_prompt
from klalign.models.snapshots import swapped
from klalign.ops.kl import kl_k3
from klalign.runs.seeding import derived_seed


def win_rates(trainer, round_index: int, anchor: dict) -> dict[str, float]:
    """Win rates of pi_{k+1} against pi_ref and pi_k on fresh samples of `win_rate_prompts` prompts, and
    KL(pi_{k+1}||pi_ref); the rows are collection chunks of the round (stored, reused on resume)."""
    if trainer.args.win_rate_prompts == 0:
        return {}
    rng = np.random.default_rng(derived_seed(trainer.args.seed, round_index, "win_rate_prompts"))
    n = trainer.args.win_rate_prompts
    pool = trainer.win_rate_pool
    prompts = [pool[i] for i in rng.choice(len(pool), n, replace=n > len(pool))]
    rank, world, size = trainer.args.process_index, trainer.args.world_size, trainer.args.prompts_per_chunk
    first_chunk = trainer.steps_per_round() * trainer.chunks_per_step()
    rows = []
    for j, start in enumerate(range(0, n, size)):
        chunk = prompts[start : start + size][rank::world]
        rows += trainer.collected(round_index, first_chunk + j, lambda: win_rate_rows(trainer, chunk, anchor))
    vs_ref = torch.tensor([r["win_vs_reference"] for r in rows], dtype=torch.float64)
    vs_prev = torch.tensor([r["win_vs_previous"] for r in rows], dtype=torch.float64)
    logratio = torch.tensor([r["logratio"] for r in rows], dtype=torch.float64)
    sem = lambda x: (x.std() / math.sqrt(len(x))).item() if len(x) > 1 else float("nan")
    return {
        "win_rate/vs_reference": vs_ref.mean().item(), "win_rate/vs_reference_sem": sem(vs_ref),
        "win_rate/vs_previous": vs_prev.mean().item(), "win_rate/vs_previous_sem": sem(vs_prev),
        "kl_k1": logratio.mean().item(), "kl_k3": kl_k3(logratio).mean().item(),
        **trainer.query_counts("eval_queries", sum(r["oracle_queries"] for r in rows)),
    }

def win_rate_rows(trainer, prompts: list, anchor: dict) -> list[dict]:
    """One sample of pi_{k+1}, pi_ref and pi_k (theta_k swapped in) per prompt and sample, compared by the oracle."""
    n = trainer.args.win_rate_samples
    ours = [c for per_prompt in trainer.generate(prompts, n) for c in per_prompt]
    refs = trainer.generate_reference(prompts, n)
    with swapped(trainer.model, anchor):
        previous = trainer.generate(prompts, n, weights=("pi_k", trainer.state.global_step))
    refs, previous = [c for p in refs for c in p], [c for p in previous for c in p]
    texts = [c.prompt for c in ours]
    vs_ref = trainer.oracle.preference(texts, [c.text for c in ours], [c.text for c in refs])  # (N,)
    vs_prev = trainer.oracle.preference(texts, [c.text for c in ours], [c.text for c in previous])  # (N,)
    batch = trainer.batch([c.prompt_ids for c in ours], [c.completion_ids for c in ours])
    logratio = trainer.policy_token_logprobs(batch, ours).sum(1) - trainer.reference_logprobs(batch)  # (N,)
    return [
        {"prompt": stored_prompt(y.prompt), "completion": y.text, "reference_completion": r.text,
         "previous_completion": q.text, "win_vs_reference": a, "win_vs_previous": b, "logratio": lr,
         "oracle_queries": 2}
        for y, r, q, a, b, lr in zip(ours, refs, previous, vs_ref.tolist(), vs_prev.tolist(), logratio.tolist())
    ]
