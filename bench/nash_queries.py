"""Exploitability against preference queries: every method of NashMPTrainer on one intransitive game.

    python bench/nash_queries.py                      # the grid below, 3 seeds
    python bench/nash_queries.py --samples-per-prompt 64 --max-queries 16384   # 128 pairs a step, less noise
    python bench/nash_queries.py --quick              # one grid point per method, 1 seed (a smoke run)
    python bench/nash_queries.py --beta 0.05 --samples-per-prompt 64 --etas 1,2,4 --inner-steps 4,8 \
        --learning-rates 0.2,0.5 --max-queries 32768 --jobs 2 --out runs/bench-nash-queries-beta005.json
                                                      # weaker regularisation, 128 pairs a step (docs/bench/nash_queries.md)
    python bench/nash_queries.py --real-model         # SmolLM2-135M + LoRA on the cyclic text judge (bench/nash_real_model.py)

The single-token test bed (ALGORITHMS.md, "The single-token test bed"; closed by construction, so no run
leaks mass off the actions) with an intransitive preference matrix over K = 8 responses and beta = 0.1.
Every method is `NashMPTrainer` with its `method` switched (nash_mp, mirror_descent, nash_md, online_ipo,
egpo, sppo, nash_prox), on the same game, the same initial model, the same seeds and the same tuning
grid (prox step size eta x inner steps M x learning rate; online IPO and EGPO step by the learning rate
alone, so they run the grid's first eta only); each inner step queries the oracle on `pairs` sampled
pairs (SPPO: K samples a prompt with K(K-1)/2 ~ M x pairs, so that a round costs it what it costs mirror
descent); the inner solver is SGD with its step size annealed within every prox step
(`anneal_prox_steps`). After every iteration `TestbedMetricsCallback` reads the policy from the logits
and records its exact exploitability; the trainer counts the preference queries.

Reported ("Comparing methods honestly"): for each grid point the queries each seed needed to bring
the exploitability below the target, their median and range; each method's best grid point (by
median); the ratio Nash-MP / Nash-MD; the median curves of the best points; and beside them the
exact (tabular) curves of `klalign.theory`, per iteration and per opponent evaluation
(`PREFERENCE_QUERIES_PER_STEP`), where a prox step is solved exactly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # a 2-thread torch run slows ~100x when another process holds a core
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from klalign import NashMPConfig, NashMPTrainer  # noqa: E402
from klalign.testbed.bandit import SingleTokenBandit, TestbedPreference  # noqa: E402
from klalign.testbed.metrics import TestbedMetricsCallback, exact_metrics  # noqa: E402
from klalign.theory import (  # noqa: E402
    PREFERENCE_QUERIES_PER_STEP,
    exploitability,
    mirror_descent,
    nash_md,
    nash_mirror_prox,
    nash_prox,
)
from klalign.trainers.nash_methods import METHODS as NASH_METHODS  # noqa: E402

METHODS = tuple(NASH_METHODS)
STEP_BY_LEARNING_RATE = ("online_ipo", "egpo")  # no prox step size: eta is not theirs to tune
# Exact iterations (EGPO's exact path is Nash-MP's and SPPO's is mirror descent's, reparametrised; online IPO
# has no parametrisation-free exact path; Nash Prox's inner game is solved exactly, so it has no query count).
EXACT = {"nash_mp": nash_mirror_prox, "mirror_descent": mirror_descent, "nash_md": nash_md, "nash_prox": nash_prox}
THEORY_NAME = {"nash_mp": "nash_mirror_prox", "mirror_descent": "mirror_descent", "nash_md": "nash_md"}
GRID = {"eta": (2.0, 4.0, 6.0), "inner_steps": (4, 8), "learning_rate": (0.1, 0.2)}
QUICK_GRID = {"eta": (4.0,), "inner_steps": (8,), "learning_rate": (0.1,)}


def sppo_samples(inner_steps: int, pairs: int) -> int:
    """K with K(K-1)/2 closest to M x pairs: SPPO's queries a prompt and round match mirror descent's."""
    return max(2, round((1 + math.sqrt(1 + 8 * inner_steps * pairs)) / 2))


def queries_per_round(method: str, inner_steps: int, prompts: int, pairs: int) -> int:
    if method == "sppo":
        k = sppo_samples(inner_steps, pairs)
        return prompts * k * (k - 1) // 2
    return len(NASH_METHODS[method].phases) * inner_steps * prompts * pairs


def run_one(folder: str, method: str, eta: float, inner_steps: int, learning_rate: float, seed: int,
            opts: dict) -> dict:
    """Train one method on the saved test bed up to the query budget; its exploitability curve."""
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    bandit = SingleTokenBandit.load(folder)
    prompts, pairs = bandit.num_prompts, opts["samples_per_prompt"]
    per_round = queries_per_round(method, inner_steps, prompts, pairs)
    samples = sppo_samples(inner_steps, pairs) if method == "sppo" else pairs
    with tempfile.TemporaryDirectory() as out:
        args = NashMPConfig(
            output_dir=out, method=method, beta=opts["beta"], eta=eta, inner_steps=inner_steps,
            samples_per_prompt=samples, num_rounds=math.ceil(opts["max_queries"] / per_round),
            prompts_per_round=prompts, prompts_per_chunk=prompts, win_rate_prompts=0, max_new_tokens=1,
            generation_batch_size=4096, optim="sgd", learning_rate=learning_rate, anneal_prox_steps=True,
            max_grad_norm=0.0, use_cpu=True, bf16=False, report_to="none", save_total_limit=1, seed=seed,
            disable_tqdm=True,
        )
        metrics = TestbedMetricsCallback(bandit, opts["beta"])
        trainer = NashMPTrainer(
            AutoModelForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder), args,
            bandit.prompt_dataset(), AutoTokenizer.from_pretrained(folder), TestbedPreference(bandit),
            callbacks=[metrics],
        )
        trainer.remove_callback(PrinterCallback)  # the per-round log lines of 72 runs would bury the tables
        try:
            trainer.train()
            diverged = False
        except (ValueError, RuntimeError) as error:  # the policy became NaN (too large a step): recorded
            if not any(word in str(error) for word in ("finite", "nan", "inf")):
                raise
            diverged = True
    queries = [h["preference_queries"] for h in trainer.state.log_history if "round" in h]
    start = exact_metrics(bandit.ref.numpy(), bandit, opts["beta"])["testbed/exploitability"]
    curve = [h["testbed/exploitability"] for h in metrics.history] + ([math.inf] if diverged else [])
    return {
        "method": method, "eta": eta, "inner_steps": inner_steps, "learning_rate": learning_rate, "seed": seed,
        "queries": [0] + queries[:len(curve)], "exploitability": [start] + curve, "diverged": diverged,
        "kl_nash_to_policy": [None] + [h["testbed/kl_nash_to_policy"] for h in metrics.history],
    }


def _run_job(job: tuple) -> dict:
    """`run_one` on a tuple of its arguments, the options recorded beside the result."""
    return {**run_one(*job), "options": job[-1]}


def run_all(folder: str, jobs: list[tuple], opts: dict, cache: Path, processes: int) -> tuple[list[dict], int]:
    """Every job's run. Each finished run is appended to `cache` (JSON lines), so an interrupted
    bench resumes where it stopped; returns the runs and how many were new."""
    def key(run):
        return run["method"], run["eta"], run["inner_steps"], run["learning_rate"], run["seed"]

    cache.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    done = {key(r): r for r in done if r["options"] == opts}
    todo = [(folder, *job, opts) for job in jobs if job not in done]
    with cache.open("a") as log:
        if processes > 1:
            from multiprocessing import get_context

            with get_context("spawn").Pool(processes) as pool:
                finished = pool.imap_unordered(_run_job, todo)
                for run in finished:
                    log.write(json.dumps(run) + "\n")
                    log.flush()
                    done[key(run)] = run
        else:
            for job in todo:
                run = _run_job(job)
                log.write(json.dumps(run) + "\n")
                log.flush()
                done[key(run)] = run
    return [done[job] for job in jobs], len(todo)


def queries_to(run: dict, target: float) -> float:
    """Queries used by the first iterate whose exploitability is below `target` (inf: never)."""
    return next((q for q, e in zip(run["queries"], run["exploitability"]) if e < target), math.inf)


def exact_curves(bandit: SingleTokenBandit, beta: float, etas, iterations: int) -> dict:
    """Mean exploitability over prompts of the exact iterations, (method, eta) -> [iteration 0..]."""
    P, ref = bandit.preference_matrix().numpy(), bandit.ref.numpy()
    out = {}
    for method, eta in itertools.product(EXACT, etas):
        if method == "nash_md" and eta * beta > 1:
            continue
        paths = [EXACT[method](P[c], ref[c], beta, eta, iterations) for c in range(len(ref))]  # (T+1, K) each
        out[(method, eta)] = np.mean([exploitability(P[c], ref[c], beta, p) for c, p in enumerate(paths)], 0)
    return out


def summarise(runs: list[dict], exact: dict, target: float, pairs: int) -> dict:
    """Print the tables; return each method's best grid point and the ratio."""
    def fmt(q):
        return "never" if math.isinf(q) else str(int(q))

    print(f"\nQueries to exploitability < {target} (first iterate below it; per seed, median [min, max]; "
          f"median final exploitability at the budget); {pairs} queries per inner step")
    print(f"{'method':<15}{'eta':>5}{'M':>4}{'lr':>6}   {'per seed':<28}{'median':>8}  {'range':<16}final exploitability")
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["eta"], r["inner_steps"], r["learning_rate"]), []).append(r)
    best: dict[str, tuple] = {}
    for key, group in sorted(groups.items()):
        needed = sorted(queries_to(r, target) for r in group)
        median = statistics.median(needed)
        if key[0] not in best or median < best[key[0]][1]:
            best[key[0]] = (key, median, needed)
        per_seed = " ".join(fmt(q) for q in needed)
        spread = f"[{fmt(needed[0])}, {fmt(needed[-1])}]"
        final = statistics.median(r["exploitability"][-1] for r in group)  # at the budget: the noise floor
        eta = "-" if key[0] in STEP_BY_LEARNING_RATE else f"{key[1]:g}"
        diverged = sum(r.get("diverged", False) for r in group)
        note = f" ({diverged} diverged)" if diverged else ""
        print(f"{key[0]:<15}{eta:>5}{key[2]:>4}{key[3]:>6g}   {per_seed:<28}{fmt(median):>8}  {spread:<16}{final:.4f}{note}")

    print("\nBest grid point per method (same grid, same seeds):")
    for method, (key, median, needed) in best.items():
        print(f"  {method:<15} eta={key[1]:g} M={key[2]} lr={key[3]:g}: median {fmt(median)} queries "
              f"[{fmt(needed[0])}, {fmt(needed[-1])}]")
    ratio = best["nash_mp"][1] / best["nash_md"][1] if "nash_mp" in best and "nash_md" in best else math.nan
    print(f"  Nash-MP / Nash-MD median queries: {ratio:.2f} (goal: <= 0.5)")

    print("\nMedian exploitability [min, max over seeds] by queries, best grid points:")
    for method, (key, _, _) in best.items():
        group = groups[key]
        print(f"  {method} (eta={key[1]:g}, M={key[2]}, lr={key[3]:g}):")
        curves = np.array([r["exploitability"] for r in group])  # (seeds, rounds+1)
        for i, q in enumerate(group[0]["queries"]):
            col = curves[:, i]
            print(f"    {q:>7} {np.median(col):.4f} [{col.min():.4f}, {col.max():.4f}]")
    print("\nExact (tabular) iterations from klalign.theory, mean exploitability over prompts by iteration:")
    for (method, eta), curve in exact.items():
        hit = next((k for k, e in enumerate(curve) if e < target), None)
        if method in THEORY_NAME:
            evals = "never" if hit is None else hit * PREFERENCE_QUERIES_PER_STEP[THEORY_NAME[method]]
            reached = f"opponent evaluations to {target}: {evals:<6}"
        else:  # Nash Prox: each iteration solves a game exactly
            reached = f"iterations to {target}: {'never' if hit is None else hit:<14}"
        print(f"  {method:<15} eta={eta:<4g} {reached} " + " ".join(f"{e:.4f}" for e in curve[:9]))
    return {m: {"eta": k[1], "inner_steps": k[2], "learning_rate": k[3], "median_queries": med, "queries": q}
            for m, (k, med, q) in best.items()} | {"ratio_nash_mp_to_nash_md": ratio}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes (one thread each)")
    parser.add_argument("--num-actions", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--game-seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--target", type=float, default=0.01)
    parser.add_argument("--samples-per-prompt", type=int, default=16, help="pairs per prompt per inner step")
    parser.add_argument("--max-queries", type=int, default=6144, help="training query budget of each run")
    parser.add_argument("--etas", default=",".join(map(str, GRID["eta"])), help="prox step sizes of the grid")
    parser.add_argument("--inner-steps", default=",".join(map(str, GRID["inner_steps"])), help="M of the grid")
    parser.add_argument("--learning-rates", default=",".join(map(str, GRID["learning_rate"])),
                        help="inner SGD step sizes of the grid")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--quick", action="store_true", help="one grid point per method, one seed")
    parser.add_argument("--out", default="runs/bench-nash-queries.json")
    parser.add_argument("--real-model", action="store_true",
                        help="SmolLM2-135M on the cyclic text judge instead (its options: bench/nash_real_model.py)")
    cli, rest = parser.parse_known_args()
    if cli.real_model:
        from nash_real_model import (
            main as real_model_main,  # the script's folder is on sys.path
        )

        return real_model_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    grid = {"eta": tuple(map(float, cli.etas.split(","))), "inner_steps": tuple(map(int, cli.inner_steps.split(","))),
            "learning_rate": tuple(map(float, cli.learning_rates.split(",")))}
    grid, seeds = (QUICK_GRID, 1) if cli.quick else (grid, cli.seeds)
    bandit = SingleTokenBandit.intransitive(cli.num_prompts, cli.num_actions, seed=cli.game_seed)
    opts = {"beta": cli.beta, "samples_per_prompt": cli.samples_per_prompt, "max_queries": cli.max_queries,
            "game": [cli.num_prompts, cli.num_actions, cli.game_seed]}
    jobs = [(m, eta, M, lr, s) for m in cli.methods.split(",") for eta, M, lr in itertools.product(*grid.values())
            for s in range(seeds) if not (m == "nash_md" and eta * cli.beta > 1)
            and not (m in STEP_BY_LEARNING_RATE and eta != grid["eta"][0])]
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        bandit.save(folder)
        runs, new = run_all(folder, jobs, opts, Path(cli.out).with_suffix(".runs.jsonl"), cli.jobs)
    print(f"{len(runs)} runs ({new} new, {time.time() - started:.0f} s); game: K={cli.num_actions}, "
          f"{cli.num_prompts} prompts, beta={cli.beta}, seed {cli.game_seed}")
    exact = exact_curves(bandit, cli.beta, grid["eta"], iterations=40)
    pairs = cli.num_prompts * cli.samples_per_prompt
    best = summarise(runs, exact, cli.target, pairs)
    Path(cli.out).parent.mkdir(parents=True, exist_ok=True)
    record = {"options": vars(cli), "grid": grid, "runs": runs, "best": best,
              "exact": {f"{m} eta={eta:g}": c.tolist() for (m, eta), c in exact.items()}}
    Path(cli.out).write_text(json.dumps(record, indent=1, default=float))
    print(f"\nwritten: {cli.out}")


if __name__ == "__main__":
    main()
