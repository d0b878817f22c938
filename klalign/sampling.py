"""Statistical rejection sampling (RSO; Liu et al. 2024, Algorithm 1; ALGORITHMS.md section 2).

Draw candidates from `pi_ref`, score them, and keep candidate y with probability
`exp((r(y) - r_max) / beta)`. If `r_max` bounds the reward, the kept samples are exact draws from
`pi_ref * exp(r / beta) / Z` and the expected acceptance rate is `Z * exp(-r_max / beta)`
(`klalign.theory.rso_acceptance_rate`). The RSO paper uses the largest reward among a prompt's
candidates as `r_max`, which is what `r_max=None` does: a slight, standard approximation.

`build_rso_dataset` turns accepted samples into preference pairs labelled by the reward and
appends them to a JSONL file prompt by prompt, so a killed run keeps everything it scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from klalign.generation import GenerationArguments, generate_responses
from klalign.oracles import RewardOracle
from klalign.feedback import stored_prompt


def rejection_sample(
    rewards: torch.Tensor, beta: float, r_max: float | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Accept each candidate with probability exp((r - r_max) / beta). (N,) rewards -> (N,) bool mask."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    rewards = rewards.to(torch.float64)
    bound = rewards.max() if r_max is None else torch.tensor(float(r_max), dtype=torch.float64)
    if (rewards > bound + 1e-12).any():
        raise ValueError(f"r_max={float(bound)} is below a candidate's reward {float(rewards.max())}")
    accept_prob = torch.exp((rewards - bound) / beta)  # (N,) in (0, 1]
    return torch.rand(rewards.shape, generator=generator, dtype=torch.float64) < accept_prob


def pair_by_reward(responses: list[str], rewards: list[float]) -> list[tuple[str, str, float, float]]:
    """Pair consecutive accepted responses; the higher reward is chosen. Ties carry no preference: dropped."""
    pairs = []
    for i in range(0, len(responses) - 1, 2):
        (a, ra), (b, rb) = (responses[i], rewards[i]), (responses[i + 1], rewards[i + 1])
        if ra == rb:
            continue
        pairs.append((a, b, ra, rb) if ra > rb else (b, a, rb, ra))
    return pairs


@dataclass
class RejectionSamplingArguments:
    """RSO's data step. YAML keys map 1:1 onto these fields."""

    prompt_dataset_path: str = field(
        default="configs/data/tiny_prompts.jsonl", metadata={"help": "Prompts to sample for (a prompt-only dataset)."}
    )
    reward_fn: str | None = field(default="vader", metadata={"help": "Reward function by name (klalign.rewards)."})
    reward_model_path: str | None = field(
        default=None, metadata={"help": "A sequence-classification reward model folder (instead of reward_fn)."}
    )
    num_candidates: int = field(default=16, metadata={"help": "Candidates drawn from the reference per prompt."})
    sampling_beta: float = field(
        default=0.5, metadata={"help": "beta of the target pi_ref * exp(r / beta) the accepted samples follow."}
    )
    r_max: float | None = field(
        default=None, metadata={"help": "Reward upper bound; default: the best candidate's reward per prompt."}
    )
    rso_dataset_path: str | None = field(
        default=None, metadata={"help": "Where the pairs are written (JSONL); default: <output_dir>/rso_pairs.jsonl."}
    )
    sampling_seed: int = field(default=0, metadata={"help": "Seed of generation and acceptance draws."})

    def __post_init__(self):
        if (self.reward_fn is None) == (self.reward_model_path is None):
            raise ValueError("set exactly one of reward_fn and reward_model_path")
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2 to form pairs, got {self.num_candidates}")
        if self.sampling_beta <= 0:
            raise ValueError(f"sampling_beta must be > 0, got {self.sampling_beta}")


def build_rso_dataset(
    reference,
    tokenizer,
    prompts: list,
    oracle: RewardOracle,
    out_path: str | Path,
    args: RejectionSamplingArguments,
    generation: GenerationArguments | None = None,
    prompts_per_batch: int = 8,
) -> dict:
    """Sample, score, accept and pair for every prompt; append pairs to `out_path` (JSONL).

    Returns statistics: candidates, accepted, acceptance rate, pairs written. Each row of the file
    is a valid preference pair (`klalign.data.load_preference_dataset` reads it) plus the rewards
    and the prompt's acceptance count. A re-run skips prompts that already have pairs in the file;
    a prompt that yielded none is sampled again (it lost nothing).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _prompts_done(out_path)
    unique = {json.dumps(p): p for p in prompts}  # duplicates would only repeat the same work
    todo = [p for key, p in unique.items() if key not in done]
    gen = torch.Generator().manual_seed(args.sampling_seed)
    stats = {"prompts": len(todo), "candidates": 0, "accepted": 0, "pairs": 0}
    with out_path.open("a") as f:
        for start in tqdm(range(0, len(todo), prompts_per_batch), desc="rejection sampling"):
            batch = todo[start : start + prompts_per_batch]
            samples = generate_responses(
                reference, tokenizer, batch, args.num_candidates, generation, generator_seed=args.sampling_seed + start,
                progress=False,
            )
            for prompt, responses in zip(batch, samples):
                rewards = oracle.score([stored_prompt(prompt)] * len(responses), responses)
                accepted = rejection_sample(rewards, args.sampling_beta, args.r_max, gen)
                kept = accepted.nonzero().flatten().tolist()
                pairs = pair_by_reward([responses[i] for i in kept], [rewards[i].item() for i in kept])
                stats["candidates"] += len(responses)
                stats["accepted"] += len(kept)
                stats["pairs"] += len(pairs)
                record = {"prompt": prompt, "accepted": len(kept), "candidates": len(responses)}
                for chosen, rejected, r_c, r_r in pairs:
                    row = {**record, "chosen": chosen, "rejected": rejected, "chosen_reward": r_c,
                           "rejected_reward": r_r}
                    f.write(json.dumps(row) + "\n")
            f.flush()
    stats["acceptance_rate"] = stats["accepted"] / max(stats["candidates"], 1)
    return stats



def _prompts_done(path: Path) -> set[str]:
    if not path.exists():
        return set()
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line: drop it
        lines = lines[:-1]
        path.write_text("".join(line + "\n" for line in lines))
    return {json.dumps(json.loads(line)["prompt"]) for line in lines}
