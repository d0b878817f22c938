"""KL/reward trade-off of checkpoints against best-of-N and the tilted frontier (ALGORITHMS.md section 4).

    klalign evaluate --config configs/tiny/evaluate.yaml
    klalign evaluate --config configs/tiny/evaluate.yaml --checkpoints runs/tiny-dpo --num_samples 4

For each checkpoint: sample `num_samples` responses per prompt, score them, and estimate
- the mean reward, and
- KL(pi || pi_ref) by k1 = l and k3 = exp(-l) - 1 + l (ALGORITHMS.md section 0), where
  l = s_pi(y) - s_ref(y) is the sequence log-ratio on the checkpoint's own samples, computed on the
  exact sampled token ids (decoding and re-encoding could change them).
Standard errors are over the sampling of responses, conditional on the prompt set (which every
checkpoint shares): se = sqrt(sum_i var_i / n) / P for P prompts with n samples each.

On the reference's own samples, with nothing sampled again:
- the best-of-N curve, N = 1, 2, 4, ..., best_of_n_max (klalign.inference.best_of_n_sampling: unbiased U-statistic over
  N-subsets; KL by Beirami et al. 2024's bound log N - (N-1)/N and by their estimator D(eps), eps the
  reference's mass of the selected reward level);
- the tilted frontier phi_lam ∝ pi_ref * exp(lam * r) (Yang et al. 2024: best-of-N and the tilt are
  asymptotically equivalent), by self-normalised weights w_j ∝ exp(lam * r_j) over a prompt's n
  samples: reward = sum_j w_j r_j, KL = sum_j w_j log(w_j * n). It is the exact tilt of the empirical
  reference law, so its KL saturates at log n: trust it only while the effective sample size is large.

Everything that can fail is checked before anything is sampled: the checkpoints exist and hold
weights, their tokenizers match the reference's, the prompt set is not empty, the reward exists.
Sampled results are cached in `<output_dir>/cache`, keyed by a hash of the model's weight files and
of every setting that changes the samples, so a re-run only samples what is new.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import AutoConfig
from transformers.utils import logging

from klalign.config.parsing import parse_config
from klalign.data.datasets import load_prompt_dataset
from klalign.data.prompts import prompt_key
from klalign.errors import INPUT_ERRORS, EvaluationError
from klalign.evaluation.checkpoints import Checkpoint, check_tokenizer, find_checkpoints
from klalign.evaluation.optimum import (
    LOW_ESS,
    captured_gain,
    optimum_estimate,
    tilt_alignment,
)
from klalign.evaluation.report import markdown_table, write_outputs
from klalign.evaluation.statistics import summarize, tilted_frontier_estimate
from klalign.generation.types import GenerationArguments
from klalign.inference.best_of_n_sampling import (
    best_of_n_curve,
    level_mass,
    sample_and_score,
)
from klalign.models.loading import (
    DTYPES,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from klalign.models.placement import (
    decided_on_main,
    place_frozen,
    process_state,
    run_launched,
    whole_model_loading,
)
from klalign.ops.logprobs import completion_logprobs
from klalign.oracles.base import RewardOracle
from klalign.oracles.build import build_reward_oracle
from klalign.runs.integrity import model_digest
from klalign.runs.manifest import digest
from klalign.runs.prompt_jobs import prompt_groups, run_groups
from klalign.runs.seeding import derived_seed

logger = logging.get_logger(__name__)
CACHE_VERSION = 2  # part of every cache key: bump it when what a cached result means changes
@dataclass
class EvaluationArguments:
    """What `klalign evaluate` compares. YAML keys map 1:1 onto these fields (sampling: GenerationArguments)."""

    checkpoints: list[str] = field(
        default_factory=list,
        metadata={"help": "Model or PEFT adapter folders, or run folders (every checkpoint-* in them is evaluated)."},
    )
    include_final_model: bool = field(
        default=True, metadata={"help": "Also evaluate the model saved at the top of each run folder."}
    )
    reference_model_path: str = field(
        default="tiny:policy",
        metadata={"help": "pi_ref, and the base adapter checkpoints load on: folder, .gguf, package:, tiny:."},
    )
    prompt_dataset_path: str = field(
        default="configs/data/tiny_prompts.jsonl", metadata={"help": "Held-out prompts (a prompt-only dataset)."}
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first max_prompts prompts."})
    reward_fn: str | None = field(default=None, metadata={"help": "Reward function by name (klalign.oracles.reward_functions), e.g. vader."})
    reward_model_path: str | None = field(
        default=None, metadata={"help": "A sequence-classification reward model folder (instead of reward_fn)."}
    )
    num_samples: int = field(default=8, metadata={"help": "Responses sampled per prompt, per model (>= 2)."})
    best_of_n_max: int = field(
        default=4, metadata={"help": "Largest N of the best-of-N curve (N = 1, 2, 4, ...; below num_samples)."}
    )
    frontier_lambdas: list[float] = field(
        default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
        metadata={"help": "Tilt strengths lam (= 1/beta) at which the frontier is estimated."},
    )
    output_dir: str = field(default="runs/evaluation", metadata={"help": "Where tables, plot and cache go."})
    logprob_batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass for log-probs."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto."})
    device: str = field(
        default="auto", metadata={"help": "Where models run: auto (a GPU when there is one, else the CPU), cpu, cuda, ..."}
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed (the same for every model)."})
    beta: float | None = field(
        default=None,
        metadata={"help": "KL coefficient of J = E r - beta KL(pi || pi_ref): with it, every model gets J, the captured "
                          "gain G of the optimum J* and KL(pi || pi*) (klalign.evaluation.optimum)."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where converted GGUF and tiny models are cached (default ~/.cache/klalign)."}
    )

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise EvaluationError(message)

        check((self.reward_fn is None) != (self.reward_model_path is None),
              "set exactly one of reward_fn and reward_model_path")
        check(self.num_samples >= 2, f"num_samples must be >= 2 (standard errors), got {self.num_samples}")
        check(1 <= self.best_of_n_max < self.num_samples,
              f"best_of_n_max must be in [1, num_samples={self.num_samples}), got {self.best_of_n_max}")
        check(all(lam >= 0 for lam in self.frontier_lambdas), f"frontier_lambdas must be >= 0: {self.frontier_lambdas}")
        check(self.max_prompts is None or self.max_prompts >= 1, f"max_prompts must be >= 1, got {self.max_prompts}")
        check(self.logprob_batch_size >= 1, f"logprob_batch_size must be >= 1, got {self.logprob_batch_size}")
        check(self.dtype in DTYPES, f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        check(self.beta is None or self.beta > 0, f"beta must be > 0 (the KL coefficient), got {self.beta}")
        check(not Path(self.output_dir).exists() or Path(self.output_dir).is_dir(),
              f"output_dir {self.output_dir!r} is a file, not a folder")


@dataclass
class EvaluationReport:
    """Everything `klalign evaluate` writes: one summary row per model, the BoN curve, the frontier."""

    reference: dict
    checkpoints: list[dict]
    best_of_n: list[dict]
    frontier: list[dict]
    settings: dict
    paths: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- sampling and statistics


def _sample(model, tokenizer, oracle, prompts, args, generation, logprob_models: dict, engine=None, key=None) -> dict:
    """Sample n responses per prompt, score them, and take s(y) under each of `logprob_models`.

    Prompts are drawn in groups seeded by their identities, spread over the processes of a launch
    (`klalign.runs.prompt_jobs`): the samples are the same on any number of processes. Every process
    returns the whole record; each field is (P, n) in prompt order.
    """
    keys = [prompt_key(p) for p in prompts]
    # HF samples at temperature 1 and top_p 1 (checked in `_prepare`) in eval mode: the sampler's log-probs of
    # its tokens are the model's own, so its scoring pass is skipped (issue 22, item 2). They equal a recompute
    # to the float rounding of another computation order (SmolLM2 fp32: 4e-5 a token; tests/test_evaluation.py).
    # vLLM's come from other kernels (and dtypes): recomputed.
    own_sampler = engine is None

    def work(group: list[int]) -> list[dict]:
        group_prompts = [prompts[i] for i in group]
        completions, rewards = sample_and_score(model, tokenizer, oracle, group_prompts, args.num_samples, generation,
                                                seed=derived_seed(args.seed, "evaluate", *(keys[i] for i in group)),
                                                engine=engine, weights_key=key, sampler_logprobs=own_sampler)
        flat = [c for per_prompt in completions for c in per_prompt]
        logps = {name: np.array([sum(c.sampler_logprobs) for c in flat]) if own_sampler and scorer is model
                 else completion_logprobs(scorer, flat, tokenizer.pad_token_id, args.logprob_batch_size)
                 for name, scorer in logprob_models.items()}
        logps = {name: logp.reshape(rewards.shape) for name, logp in logps.items()}  # (g, n) each
        return [{"texts": [c.text for c in per_prompt], "completion_ids": [c.completion_ids for c in per_prompt],
                 "rewards": rewards[j].tolist(), **{name: logp[j].tolist() for name, logp in logps.items()}}
                for j, per_prompt in enumerate(completions)]

    done: dict[int, dict] = {}
    groups = prompt_groups(list(range(len(prompts))), generation.generation_batch_size // args.num_samples)
    run_groups(groups, work, lambda group, results: done.update(zip(group, results)), desc="sampling")
    done = decided_on_main(lambda: done)
    return {field: [done[i][field] for i in range(len(prompts))] for field in done[0]}


def _cached(path: Path, compute) -> dict:
    """The JSON at `path`, or `compute()` written there atomically (a killed run leaves no torn entry).

    The main process decides and reads, so every process of a launch takes the same branch."""
    record = decided_on_main(lambda: json.loads(path.read_text()) if path.is_file() else None)
    if record is not None:
        return record
    record = compute()
    if PartialState().is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    return record


# ----------------------------------------------------------------------------- the evaluation


@dataclass
class _Plan:
    """Everything validated before sampling: models, prompts, oracle, cache keys."""

    checkpoints: list[Checkpoint]
    prompts: list
    oracle: RewardOracle
    tokenizer: object
    reference_path: str
    reference_key: str
    keys: dict[str, str]
    settings: dict


def _reward_id(args: EvaluationArguments, oracle: RewardOracle | None) -> str:
    if oracle is not None:
        return f"oracle:{oracle.name}"
    if args.reward_fn is not None:
        return f"fn:{args.reward_fn}"
    return f"model:{model_digest(Path(resolve_model_path(args.reward_model_path, args.cache_dir)))}"


def _prepare(args: EvaluationArguments, generation: GenerationArguments, oracle: RewardOracle | None = None) -> _Plan:
    """Validate everything and compute cache keys; nothing is sampled and no policy weights are loaded."""
    if generation.temperature != 1.0 or generation.top_p != 1.0:
        raise EvaluationError(
            f"temperature={generation.temperature}, top_p={generation.top_p}: the KL estimators need samples from "
            "the model itself, so evaluate with temperature 1 and top_p 1"
        )
    weights_digest = functools.cache(model_digest)  # each folder's weights hashed once: here and for the cache keys
    checkpoints = find_checkpoints(args.checkpoints, args.include_final_model, weights_digest)
    prompts = load_prompt_dataset(args.prompt_dataset_path)["prompt"][: args.max_prompts]
    reference_path = resolve_model_path(args.reference_model_path, args.cache_dir)
    tokenizer = load_tokenizer(reference_path)
    vocab_size = AutoConfig.from_pretrained(reference_path).vocab_size
    for checkpoint in checkpoints:
        check_tokenizer(checkpoint, tokenizer, vocab_size)
    reward_id = _reward_id(args, oracle)
    if oracle is None:
        with whole_model_loading():
            oracle = build_reward_oracle(args.reward_fn, args.reward_model_path, dtype=args.dtype,
                                         cache_dir=args.cache_dir)
        oracle.prepare(device=evaluation_device(args.device))

    gen = asdict(generation)
    settings = {
        "version": CACHE_VERSION, "prompts": digest({"prompts": prompts}), "reward": reward_id,
        "num_samples": args.num_samples, "seed": args.seed, "generation": gen, "dtype": args.dtype,
    }
    reference_digest = model_digest(Path(reference_path))
    keys = {
        c.name: digest(dict(model=weights_digest(c.path), adapter=c.is_adapter, reference=reference_digest, **settings))
        for c in checkpoints
    }
    reference_key = digest(dict(model=reference_digest, role="reference", **settings))
    settings = {**settings, "num_prompts": len(prompts), "reference_model_path": args.reference_model_path}
    return _Plan(checkpoints, prompts, oracle, tokenizer, reference_path, reference_key, keys, settings)


def _load(path: str, args: EvaluationArguments, adapter_path: str | None = None):
    """A model whole on the evaluation device (`device`), in the configured dtype. An adapter is merged into its
    base weights: the model is frozen here, and PEFT's separate adapter matmuls on every linear layer cost a
    LoRA checkpoint's sampling ~10% on CPU (bench/evaluate_levers.py). The merged model computes W x + s B A x
    as (W + s B A) x, equal to float rounding; its samples and their log-probs come from that one model."""
    with whole_model_loading():
        model = load_causal_lm(path, dtype=args.dtype, adapter_path=adapter_path, trainable=False,
                               cache_dir=args.cache_dir)
    if adapter_path is not None:
        model = model.merge_and_unload()
    return place_frozen(model, device=evaluation_device(args.device))


def evaluation_device(device: str) -> torch.device:
    """`auto`: this process's accelerator (a GPU when there is one), else the CPU; or the named device."""
    return PartialState().device if device == "auto" else torch.device(device)


def evaluate_checkpoints(
    args: EvaluationArguments, generation: GenerationArguments | None = None, oracle: RewardOracle | None = None
) -> EvaluationReport:
    """Evaluate every checkpoint against the reference, best-of-N and the frontier; write the outputs.

    `oracle` overrides the reward named in `args` (any `RewardOracle`; its `name` enters the cache key).
    """
    generation = generation or GenerationArguments()
    plan = _prepare(args, generation, oracle)
    cache = Path(args.output_dir) / "cache"
    reference = None

    def reference_model():
        nonlocal reference
        if reference is None:
            reference = _load(plan.reference_path, args)
        return reference

    engine = None

    def vllm_engine():  # generation_backend: vllm: one engine, every model's weights pushed into it in turn
        nonlocal engine
        if generation.generation_backend == "vllm" and engine is None:
            from klalign.generation.vllm_engine import engine_for

            engine = engine_for(reference_model(), plan.tokenizer, generation, args.seed)
        return engine

    def sample_reference():
        model = reference_model()
        return _sample(model, plan.tokenizer, plan.oracle, plan.prompts, args, generation, {"ref_logprobs": model},
                       vllm_engine(), "reference")

    ref_samples = _cached(cache / f"reference-{plan.reference_key}.json", sample_reference)
    rows = []
    for checkpoint in tqdm(plan.checkpoints, desc="checkpoints", disable=not PartialState().is_main_process):
        def sample_checkpoint(checkpoint=checkpoint):
            model = (_load(plan.reference_path, args, adapter_path=str(checkpoint.path)) if checkpoint.is_adapter
                     else _load(str(checkpoint.path), args))
            record = _sample(model, plan.tokenizer, plan.oracle, plan.prompts, args, generation,
                             {"logprobs": model, "ref_logprobs": reference_model()}, vllm_engine(), checkpoint.name)
            record["logratios"] = (np.asarray(record["logprobs"]) - np.asarray(record["ref_logprobs"])).tolist()
            return record

        # Keyed by content only: a final model identical to the last checkpoint is not sampled twice.
        samples = _cached(cache / f"checkpoint-{plan.keys[checkpoint.name]}.json", sample_checkpoint)
        rows.append(summarize(checkpoint.name, samples, checkpoint.step, str(checkpoint.path),
                              np.asarray(ref_samples["rewards"])))
        if args.beta is not None:
            rows[-1].update(captured_gain(ref_samples["rewards"], samples["rewards"], samples["logratios"], args.beta,
                                          args.seed))
            rows[-1].update(tilt_alignment(samples["rewards"], samples["logratios"], args.beta, args.seed))

    rewards = np.asarray(ref_samples["rewards"])  # (P, n)
    eps = level_mass(rewards, np.asarray(ref_samples["ref_logprobs"]),
                     [[tuple(ids) for ids in per] for per in ref_samples["completion_ids"]])
    ns = sorted({2**k for k in range(args.best_of_n_max.bit_length())} | {args.best_of_n_max})  # 1, 2, 4, ..., N_max
    reference_row = summarize("reference", ref_samples, None, args.reference_model_path)
    best_of_n = best_of_n_curve(rewards, eps, ns)
    if args.beta is not None:
        reference_row.update(optimum_estimate(rewards, args.beta, args.seed))
        for row in best_of_n:  # best-of-N of pi_ref as a policy: its J by its reward and KL estimate
            row["objective"] = row["reward"] - args.beta * row["kl_estimate"]
        if reference_row["ess"] < LOW_ESS and PartialState().is_main_process:
            logger.warning(f"beta {args.beta:g}: the reference samples' effective sample size is {reference_row['ess']:.1f} "
                           f"per prompt (below {LOW_ESS:g}), where the log-mean-exp estimate of J* is biased low by "
                           "more than its standard error (README): sample more (num_samples) or raise beta")
    report = EvaluationReport(
        reference=reference_row,
        checkpoints=rows,
        best_of_n=best_of_n,
        frontier=tilted_frontier_estimate(rewards, args.frontier_lambdas),
        settings={**plan.settings, "best_of_n_max": args.best_of_n_max, "beta": args.beta},
    )
    if PartialState().is_main_process:
        report.paths = write_outputs(report, args.output_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    """`klalign evaluate --config configs/tiny/evaluate.yaml [--field value ...]`; under `accelerate launch -m
    klalign.cli evaluate ...` the prompts are spread over the processes, each process dies with the launcher,
    and the process group is closed before the interpreter shuts down (`run_launched`)."""
    return run_launched(_evaluate_main, argv)


def _evaluate_main(argv: list[str] | None) -> int:
    process_state()
    try:
        args, generation = parse_config(EvaluationArguments, GenerationArguments, args=argv)
        report = evaluate_checkpoints(args, generation)
    except INPUT_ERRORS as error:
        if os.environ.get("KLALIGN_DEBUG", "") not in ("", "0"):
            raise
        print(f"klalign evaluate: error: {error} (KLALIGN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    if PartialState().is_main_process:
        print(markdown_table(report))
        for kind, path in report.paths.items():
            print(f"{kind:>5}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
