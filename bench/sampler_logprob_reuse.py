"""The online round with and without the sampler's own log-probs in place of the frozen policy pass (issue 22,
item 2), side by side in one process, on SmolLM2-135M-Instruct fp32 + LoRA as bench/online_vs_trl.py runs it.

    OMP_NUM_THREADS=1 KLALIGN_CACHE=/work/klalign-cache python bench/sampler_logprob_reuse.py --prompts 16 --max-new-tokens 32

`IterativeDPOTrainer` (HF backend, temperature 1, best vs worst of 2 or 4 samples, one DPO step a round) exactly as
`bench/online_vs_trl.py --model smollm2` builds it. "kept": this branch, the main samples' per-token log-probs
are the sampler's (`OnlineTrainer.policy_token_logprobs`). "recomputed": the same trainer with the lever off
(`_fp32 = False`: HF records no log-probs at temperature 1 and the frozen pass runs), which is the path before
(35a5474). Runs alternate; per round: wall time, collection time (`_collect_round`: sampling, VADER, the
main samples' policy and reference log-probs, the pairs' reference log-probs) and the frozen pass's own time.
Medians of the rounds after each run's first. Writes docs/bench/sampler_logprob_reuse.md. A benchmark, never a test.
"""

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from datetime import date

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from online_vs_trl import SMOLLM2, RoundTimer, load_avg, smollm2_trainer  # noqa: E402 (the script's folder is on sys.path)


def run(args, tokenizer, prompts, samples: int, kept: bool) -> dict[str, list[float]]:
    timer = RoundTimer("round")
    trainer = smollm2_trainer(args, tokenizer, prompts, samples, [timer])
    if not kept:
        trainer._fp32 = False  # the lever off: no log-probs recorded at temperature 1, the frozen pass runs
    collect, frozen, collecting = [], [], [False]
    collect_round, frozen_pass = trainer._collect_round, trainer.frozen_policy_token_logprobs

    def timed_collect(round_index):
        collecting[0] = True
        frozen.append(0.0)
        start = time.perf_counter()
        out = collect_round(round_index)
        collect.append(time.perf_counter() - start)
        collecting[0] = False
        return out

    def timed_frozen(batch):
        start = time.perf_counter()
        out = frozen_pass(batch)
        if collecting[0]:
            frozen[-1] += time.perf_counter() - start
        return out

    trainer._collect_round = timed_collect
    trainer.frozen_policy_token_logprobs = timed_frozen
    trainer.train()
    return {"round": timer.rounds(), "collect": collect, "frozen": frozen}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--out", default="docs/bench/sampler_logprob_reuse.md")  # rewritten after every run
    args = parser.parse_args()
    from klalign import load_prompt_dataset, load_tokenizer

    start_load, uptime = load_avg(), subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    tokenizer = load_tokenizer(SMOLLM2)
    prompts = load_prompt_dataset("configs/data/chat_prompts.jsonl")
    variants = [(n, kept) for n in args.samples for kept in (True, False)]
    results = {v: [] for v in variants}
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else [v for pair in zip(variants[1::2], variants[::2]) for v in pair]
        for v in order:
            results[v].append(run(args, tokenizer, prompts, *v))
            gc.collect()
            got = results[v][-1]
            print(f"  {v[0]} samples, {'kept' if v[1] else 'recomputed'}: rounds "
                  f"{', '.join(f'{t:.1f}' for t in got['round'])} s, collect {', '.join(f'{t:.1f}' for t in got['collect'])}"
                  f" s, frozen pass {', '.join(f'{t:.2f}' for t in got['frozen'])} s (load {load_avg()})", flush=True)
            write(args, results, start_load, uptime)  # after every run: a stopped benchmark keeps its table


def write(args, results, start_load, uptime):
    """The table of the runs so far (medians of the rounds after each run's first), printed and written."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    done = {v: runs for v, runs in results.items() if runs}

    def steady(v, key):
        return statistics.median(t for one in done[v] for t in one[key][1:])

    lines = [
        f"SmolLM2-135M-Instruct fp32 + LoRA (r 8, all linear; reference = disabled adapter), iterative DPO best vs worst, "
        f"{args.prompts} chat prompts a round, up to {args.max_new_tokens} new tokens at temperature 1, VADER, one DPO "
        f"step a round; {args.rounds} rounds a run, alternated runs, medians of the rounds after each run's first. "
        f"torch threads {torch.get_num_threads()}, 2 CPU cores shared with other jobs. Load average (1/5/15 min) at "
        f"start {start_load}, now {load_avg()}.",
        "",
        "| samples per prompt | main-sample log-probs | runs | s per round | collection s per round | frozen pass s per "
        "round | round vs recomputed | collection vs recomputed | per-round times (s), by run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (n, kept), runs in done.items():
        base = (n, False)
        ratio = lambda key: f"{steady((n, kept), key) / steady(base, key):.3f}x" if base in done else "-"  # noqa: E731
        lines.append(f"| {n} | {'kept from the sampler' if kept else 'recomputed (before)'} | {len(runs)} | "
                     f"{steady((n, kept), 'round'):.2f} | {steady((n, kept), 'collect'):.2f} | "
                     f"{steady((n, kept), 'frozen'):.2f} | {ratio('round')} | {ratio('collect')} | "
                     f"{'; '.join(', '.join(f'{t:.1f}' for t in one['round']) for one in runs)} |")
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    with open(args.out, "w") as f:
        f.write("# The sampler's own log-probs in place of the frozen policy pass (issue 22, item 2)\n\n"
                f"`OMP_NUM_THREADS=1 KLALIGN_CACHE=/work/klalign-cache HF_HUB_OFFLINE=1 python {' '.join(sys.argv)}`"
                f"\n\n{date.today().isoformat()}, commit {commit} (`uptime` at start: {uptime}).\n\n" + table + "\n")


if __name__ == "__main__":
    main()
