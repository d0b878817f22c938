"""Optimistic vs greedy KL-regularised online RLHF on the single-token test bed: cumulative regret against T.

    python bench/optimistic_regret.py                       # gamma 0 and 0.5, 5 seeds, 300 rounds, tuning grid
    python bench/optimistic_regret.py --seeds 3 --rounds 100 --gammas 0 0.25 0.5 1 --lrs 0.01 --epochs 1

The instance is `SingleTokenBandit.underexplored` (one-hot linear features over (prompt, action);
the best action of every prompt has reference mass e^best_log_mass and reward 1, the others U(0, 0.5)),
observed through `TestbedReward` with Gaussian noise. `OptimisticKLTrainer` runs with the tabular
feature map and the linear (ridge + elliptical bonus) learner; gamma = 0 is the greedy learner and
every run shares all other settings (ridge, k, prompts, noise). Every gamma gets the same tuning
budget: the grid of learning rates x policy-gradient steps a round (`--lrs`, `--epochs`), each point
run on every seed; each gamma is reported at its own best point (lowest median cumulative regret)
and the whole grid is printed too. The policy trains its
output layer only: the test bed's hidden states are then fixed features and the policy a softmax over
them, the Gibbs-policy class of paper 000 (full fine-tuning with Adam moves the hidden states that
the test bed's output layer was solved on, and mass leaks to EOS: an EOS sample within 80 rounds at
lr 1e-3 in a trial run).

Regret is exact (`TestbedMetricsCallback`): the played policies pi_0 = pi_ref, pi_1, ..., pi_{T-1},
`J(pi*) - J(pi_t)` averaged over prompts, summed over rounds. Beside it, the exact regime:
`klalign.theory.simulate_kl_ucb` on the same bandit, one sample per step and the Gibbs policy played
exactly, with T * prompts * k steps; its regret is reported per round (each block of prompts * k
steps averaged), so the curves share units. Seeds change sampling and oracle noise; the instance is
fixed. Prints the tables (medians, [min, max] over seeds), writes a PNG and the curves as JSON
beside it. A benchmark, never a test.
"""

import argparse
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import PrinterCallback  # noqa: E402

from klalign.testbed.bandit import SingleTokenBandit, TestbedReward  # noqa: E402
from klalign.testbed.metrics import TestbedMetricsCallback, exact_metrics  # noqa: E402
from klalign.theory import LinearBandit, simulate_kl_ucb  # noqa: E402
from klalign.trainers.features import TabularFeatures  # noqa: E402
from klalign.trainers.optimistic import OptimisticKLConfig, OptimisticKLTrainer  # noqa: E402


def make_bandit(args) -> SingleTokenBandit:
    return SingleTokenBandit.underexplored(num_prompts=args.prompts, num_actions=args.actions, seed=args.instance_seed,
                                           best_mass=math.exp(args.best_log_mass))


def run_trainer(bandit: SingleTokenBandit, gamma: float, lr: float, epochs: int, seed: int, args,
                workdir: str) -> tuple[np.ndarray, float]:
    """Per-round regret of the played policies (T,) and the final KL(pi_T || pi*) of one trainer run."""
    policy, reference = bandit.build_model(seed=0), bandit.build_model(seed=0)
    policy.requires_grad_(False)
    policy.lm_head.requires_grad_(True)
    config = OptimisticKLConfig(
        output_dir=tempfile.mkdtemp(dir=workdir), beta=args.beta, num_rounds=args.rounds,
        prompts_per_round=bandit.num_prompts, prompts_per_chunk=bandit.num_prompts,
        samples_per_prompt=args.samples, per_device_train_batch_size=bandit.num_prompts * args.samples,
        max_new_tokens=1, generation_batch_size=256, learning_rate=lr, epochs_per_round=epochs,
        lr_scheduler_type="constant",
        reward_learner="linear", gamma=gamma, ridge=args.ridge, r_max=1.0, seed=seed,
        use_cpu=True, bf16=False, report_to="none", save_total_limit=1, disable_tqdm=True,
    )
    metrics = TestbedMetricsCallback(bandit, args.beta)
    trainer = OptimisticKLTrainer(
        model=policy, ref_model=reference, args=config, train_dataset=bandit.prompt_dataset(),
        processing_class=bandit.tokenizer, oracle=TestbedReward(bandit, noise_std=args.noise, seed=seed),
        feature_map=TabularFeatures(bandit.features, bandit.prompts, bandit.actions), callbacks=[metrics],
    )
    trainer.remove_callback(PrinterCallback)  # 300 rounds of logs would bury the table
    trainer.train()
    first = exact_metrics(bandit.ref.numpy(), bandit, args.beta)["testbed/regret"]  # pi_0 = pi_ref
    regret = np.array([first] + [h["testbed/regret"] for h in metrics.history[:-1]])  # (T,)
    return regret, metrics.history[-1]["testbed/kl_to_optimum"]


def run_exact(bandit: SingleTokenBandit, gamma: float, seed: int, args) -> np.ndarray:
    """simulate_kl_ucb on the same bandit, one sample a step; regret averaged per round of prompts * k steps. (T,)"""
    linear = LinearBandit(bandit.features.numpy(), bandit.ref.numpy(), bandit.theta.numpy(), args.noise)
    per_round = bandit.num_prompts * args.samples
    steps = simulate_kl_ucb(linear, args.beta, gamma, args.rounds * per_round, ridge=args.ridge, r_max=1.0, seed=seed)
    return steps.reshape(args.rounds, per_round).mean(1)


def spread(values) -> str:
    return f"{statistics.median(values):7.3f} [{min(values):.3f}, {max(values):.3f}]"


def print_grid(grid: dict, args) -> None:
    """Median cumulative regret (and final KL) of every gamma at every tuning point."""
    print(f"\nTuning grid: median cumulative regret at T={args.rounds} [final KL(pi_T || pi*)], {args.seeds} seeds")
    points = list(itertools.product(args.lrs, args.epochs))
    print(f"{'gamma':>6} | " + " | ".join(f"{f'lr={lr} steps={e}':<24}" for lr, e in points))
    for g in args.gammas:
        cells = [f"{statistics.median(r.sum() for r in grid[g, p]['regret']):7.3f} "
                 f"[{statistics.median(grid[g, p]['final_kl']):.3f}]" for p in points]
        print(f"{g:>6} | " + " | ".join(f"{c:<24}" for c in cells))


def print_table(results: dict, exact: dict, finals: dict, chosen: dict, args) -> None:
    checkpoints = sorted({t for t in (10, 30, 100, 300, 1000, args.rounds) if t <= args.rounds})
    greedy = 0.0 if 0.0 in results else None
    print(f"\nCumulative regret sum_t J(pi*) - J(pi_t), median [min, max] over {args.seeds} seeds "
          f"(beta={args.beta}, noise={args.noise}, ridge={args.ridge}, best mass e^{args.best_log_mass}, "
          f"{args.prompts} prompts x {args.samples} samples a round); each gamma at its best grid point:")
    for g, (lr, e) in chosen.items():
        print(f"  gamma={g}: lr={lr}, {e} policy-gradient step(s) a round")
    names = [f"{kind} gamma={g}" for g in results for kind in ("trainer", "exact")]
    print(f"{'T':>5} | " + " | ".join(f"{name:<23}" for name in names))
    for t in checkpoints:
        cells = [f"{spread([r[:t].sum() for r in results[g]])} | {spread([r[:t].sum() for r in exact[g]])}"
                 for g in results]
        print(f"{t:>5} | " + " | ".join(cells))
    print("\nAt T =", args.rounds)
    for g in results:
        total = [r.sum() for r in results[g]]
        line = (f"  gamma={g}: cumulative {spread(total)}; last-10-round regret "
                f"{spread([r[-10:].mean() for r in results[g]])}; final KL(pi_T || pi*) {spread(finals[g])}")
        if greedy is not None and g != greedy:
            ratios = [a / b for a, b in zip(total, (r.sum() for r in results[greedy]))]
            line += f"; ratio to greedy (same seed) {spread(ratios)}"
        print(line)


def plot(results: dict, exact: dict, chosen: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = np.arange(1, args.rounds + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(results):
        color = f"C{i}"
        name = "greedy" if g == 0 else "optimistic"
        lr, steps = chosen[g]
        for curves, style, label in ((results[g], "-", f"trainer, {name} (gamma={g}; lr={lr}, {steps} step/round)"),
                                     (exact[g], "--", f"exact KL-UCB, {name} (gamma={g})")):
            cumulative = np.cumsum(np.stack(curves), axis=1)  # (seeds, T)
            ax.plot(rounds, np.median(cumulative, 0), style, color=color, label=label)
            alpha = 0.15 if style == "-" else 0.07
            ax.fill_between(rounds, cumulative.min(0), cumulative.max(0), color=color, alpha=alpha)
    ax.set_xscale("log")
    ax.set_xlabel(f"round T ({args.prompts} prompts x {args.samples} samples a round)")
    ax.set_ylabel("cumulative regret  sum_t J(pi*) - J(pi_t)")
    ax.set_title(f"Optimistic vs greedy, underexplored test bed (median, min-max over {args.seeds} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"\nplot: {args.out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.01], help="tuning grid: learning rates")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2], help="tuning grid: steps a round")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--actions", type=int, default=10)
    parser.add_argument("--best-log-mass", type=float, default=-5.0)
    parser.add_argument("--instance-seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=8, help="k, samples per prompt a round")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--ridge", type=float, default=1.0)
    parser.add_argument("--out", default="runs/bench/optimistic_regret.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bandit = make_bandit(args)
    grid = {}
    with tempfile.TemporaryDirectory() as workdir:
        for g, lr, e in itertools.product(args.gammas, args.lrs, args.epochs):
            runs = grid[g, (lr, e)] = {"regret": [], "final_kl": []}
            for seed in range(args.seeds):
                start = time.perf_counter()
                regret, final_kl = run_trainer(bandit, g, lr, e, seed, args, workdir)
                runs["regret"].append(regret)
                runs["final_kl"].append(final_kl)
                print(f"gamma={g} lr={lr} steps={e} seed={seed}: cumulative regret {regret.sum():.3f}, "
                      f"final KL {final_kl:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    chosen = {g: min(((lr, e) for lr, e in itertools.product(args.lrs, args.epochs)),
                     key=lambda p: statistics.median(r.sum() for r in grid[g, p]["regret"])) for g in args.gammas}
    results = {g: grid[g, chosen[g]]["regret"] for g in args.gammas}
    finals = {g: grid[g, chosen[g]]["final_kl"] for g in args.gammas}
    exact = {g: [run_exact(bandit, g, seed, args) for seed in range(args.seeds)] for g in args.gammas}
    print_grid(grid, args)
    print_table(results, exact, finals, chosen, args)
    plot(results, exact, chosen, args)
    curves = {f"gamma={g} lr={lr} steps={e}": [r.tolist() for r in runs["regret"]]
              for (g, (lr, e)), runs in grid.items()}
    curves.update({f"exact gamma={g}": [r.tolist() for r in exact[g]] for g in args.gammas})
    Path(args.out).with_suffix(".json").write_text(json.dumps(curves))


if __name__ == "__main__":
    main()
