"""Statistical rejection sampling (RSO; Liu et al. 2024, Algorithm 1; ALGORITHMS.md section 2).

Draw candidates from `pi_ref`, score them, and keep candidate y with probability
`exp((r(y) - r_max) / beta)`. If `r_max` bounds the reward, the kept samples are exact draws from
`pi_ref * exp(r / beta) / Z` and the expected acceptance rate is `Z * exp(-r_max / beta)`
(`klalign.theory.rso_acceptance_rate`). The RSO paper uses the largest reward among a prompt's
candidates as `r_max`, which is what `r_max=None` does: a slight, standard approximation.

`build_rso_dataset` turns accepted samples into preference pairs labelled by the reward and
appends them to a JSONL file prompt by prompt, so a killed run keeps everything it scored and,
resumed, writes the same file as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import klalign
from klalign.config.checks import check_beta
from klalign.data.prompts import as_turn, prompt_key
from klalign.generation.sample import sample_completions
from klalign.generation.types import Completion, GenerationArguments
from klalign.models.placement import decided_on_main
from klalign.oracles.base import RewardOracle
from klalign.runs.manifest import (
    SAMPLED_VOCAB,
    check_or_write,
    model_fingerprint,
    tokenizer_fingerprint,
)
from klalign.runs.prompt_jobs import (
    append_lines,
    prompt_groups,
    read_jsonl,
    rewrite_lines,
    run_groups,
    unique_prompts,
)
from klalign.runs.seeding import derived_seed


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


PAIRINGS = ("consecutive", "all")


def pair_by_reward(responses: list, rewards: list[float], pairing: str = "consecutive") -> list[tuple]:
    """Pairs (chosen, rejected, its reward, the other's) of accepted responses (texts or `Completion`s), the
    higher reward chosen; ties carry no preference and are dropped.

    "consecutive": responses 0-1, 2-3, ... (each in at most one pair, as in the RSO paper). "all": every one of
    the K (K - 1) / 2 pairs. Both keep the tilt as DPO's population optimum under expected labels (a pair's
    loss is minimised at the same log-ratio whichever pairs are formed); "all" gives each query K - 1 comparisons
    instead of one, which is where a small oracle budget's signal is (docs/captured_gain.md)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if pairing == "consecutive":
        index_pairs = [(i, i + 1) for i in range(0, len(responses) - 1, 2)]
    else:
        index_pairs = [(i, j) for i in range(len(responses)) for j in range(i + 1, len(responses))]
    pairs = []
    for i, j in index_pairs:
        (a, ra), (b, rb) = (responses[i], rewards[i]), (responses[j], rewards[j])
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
    reward_fn: str | None = field(default=None, metadata={"help": "Reward function by name (klalign.oracles.reward_functions), e.g. vader."})
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
    pairing: str = field(
        default="consecutive", metadata={"help": "How a prompt's accepted responses are paired: 'consecutive' "
                                         "(0-1, 2-3, ...: each in one pair) or 'all' (every pair)."}
    )

    def __post_init__(self):
        if (self.reward_fn is None) == (self.reward_model_path is None):
            raise ValueError("set exactly one of reward_fn and reward_model_path")
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2 to form pairs, got {self.num_candidates}")
        check_beta(self.sampling_beta, "sampling_beta")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")


def build_rso_dataset(
    reference,
    tokenizer,
    prompts: list,
    oracle: RewardOracle,
    out_path: str | Path,
    args: RejectionSamplingArguments,
    generation: GenerationArguments | None = None,
) -> dict:
    """Sample, score, accept and pair for every prompt; append each prompt's pairs to `out_path` (JSONL).

    Each row of the file is a valid preference pair in the prompt's own format (a string, or a
    conversation with assistant-message responses: `klalign.data.datasets.load_preference_dataset` reads it)
    plus the rewards and the prompt's acceptance count. The oracle sees each prompt as given.

    Reproducible and resumable (`klalign.runs.prompt_jobs`): candidates are drawn per group of prompts
    with a seed derived from `sampling_seed` and the prompts, acceptance draws per prompt from a
    generator seeded by the prompt. A prompt is done once its line is in the index file beside the
    pairs (`<name>.prompts.jsonl`, written after its pairs); a re-run skips done prompts, and pairs of
    a prompt a kill left without an index line are dropped and drawn again (identically). Under a
    multi-process launch every process calls this with the same prompts; the main process writes.
    Returns statistics over every prompt in the index: prompts, candidates, accepted, acceptance
    rate, pairs, and `sampled` (prompts drawn by this call).
    """
    generation = generation or GenerationArguments()
    out_path = Path(out_path)
    index_path = out_path.with_name(f"{out_path.stem}.prompts.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    decided_on_main(lambda: _check_manifest(out_path, reference, oracle, args, generation))
    done = decided_on_main(lambda: _rso_done(out_path, index_path))
    unique = unique_prompts(prompts)
    groups = prompt_groups(list(unique), generation.generation_batch_size // args.num_candidates)
    todo = [g for g in groups if any(key not in done for key in g)]

    engine = None
    if generation.generation_backend == "vllm":
        from klalign.generation.vllm_engine import engine_for

        engine = engine_for(reference, tokenizer, generation, args.sampling_seed)

    def work(keys: list[str]) -> list[dict]:
        group = [unique[k] for k in keys]
        samples = sample_completions(reference, tokenizer, group, args.num_candidates, generation,
                                     seed=derived_seed(args.sampling_seed, "rso", *keys), progress=False,
                                     engine=engine, weights_key="sampler")
        return [_accept_and_pair(key, prompt, cands, oracle, args, vocab)
                for key, prompt, cands in zip(keys, group, samples)]

    sampled = []
    vocab = tokenizer_fingerprint(tokenizer)

    def write(keys: list[str], results: list[dict]) -> None:
        for key, result in zip(keys, results):
            if key in done:
                continue
            append_lines(out_path, [json.dumps(row) for row in result.pop("rows")])
            append_lines(index_path, [json.dumps(result)])
            done[key] = result
            sampled.append(key)

    run_groups(todo, work, write, desc="rejection sampling")
    records = list(done.values())
    stats = {key: sum(r[key] for r in records) for key in ("candidates", "accepted", "pairs")}
    stats.update(prompts=len(records), sampled=len(sampled),
                 acceptance_rate=stats["accepted"] / max(stats["candidates"], 1))
    return decided_on_main(lambda: stats)


def _check_manifest(out_path: Path, reference, oracle, args, generation) -> None:
    """The same settings always draw the same pairs, so a re-run continues the file; other settings never may."""
    settings = {"klalign_version": klalign.__version__, "sampler": model_fingerprint(reference),
                "oracle": oracle.fingerprint(), "generation": dataclasses.asdict(generation),
                **{k: getattr(args, k) for k in ("num_candidates", "sampling_beta", "r_max", "sampling_seed",
                                                 "pairing")}}
    check_or_write(out_path.with_name(f"{out_path.stem}.manifest.json"), settings, out_path.exists(), True,
                   "the RSO pairs file")


def _accept_and_pair(key: str, prompt, candidates: list[Completion], oracle: RewardOracle,
                     args: RejectionSamplingArguments, vocab: str) -> dict:
    """One prompt's candidates scored, accepted (a generator seeded by the prompt) and paired. Each row carries
    the text and the sampled tokens themselves (`prompt_ids`, `chosen_ids`, `rejected_ids`, with the tokenizer's
    fingerprint): `klalign.DPOTrainer` trains on those, so a reply cut at max_new_tokens gets no end-of-turn
    token that was never sampled, as the chat template would add to its text."""
    responses = [c.text for c in candidates]
    rewards = oracle.score([prompt] * len(responses), responses)
    generator = torch.Generator().manual_seed(derived_seed(args.sampling_seed, "accept", key))
    kept = rejection_sample(rewards, args.sampling_beta, args.r_max, generator).nonzero().flatten().tolist()
    pairs = pair_by_reward([candidates[i] for i in kept], [rewards[i].item() for i in kept], args.pairing)
    record = {"prompt": prompt, "accepted": len(kept), "candidates": len(responses)}
    rows = [{**record, "chosen": as_turn(prompt, chosen.text), "rejected": as_turn(prompt, rejected.text),
             "chosen_reward": r_c, "rejected_reward": r_r, "prompt_ids": chosen.prompt_ids,
             "chosen_ids": chosen.completion_ids, "rejected_ids": rejected.completion_ids, SAMPLED_VOCAB: vocab}
            for chosen, rejected, r_c, r_r in pairs]
    return {**record, "pairs": len(pairs), "rows": rows}


def _rso_done(out_path: Path, index_path: Path) -> dict[str, dict]:
    """{prompt key: index record} of finished prompts; pairs of unfinished prompts are dropped from the file."""
    done = {prompt_key(r["prompt"]): r for r in read_jsonl(index_path)}
    rows = read_jsonl(out_path)
    kept = [row for row in rows if prompt_key(row["prompt"]) in done]
    if len(kept) < len(rows):
        rewrite_lines(out_path, [json.dumps(row) for row in kept])
    return done
