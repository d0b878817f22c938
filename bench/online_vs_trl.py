"""One online round (generate, score, update) per second: klalign against TRL's OnlineDPOTrainer.

    python bench/online_vs_trl.py                      # tiny Llama (hidden 256, 4 layers), CPU
    python bench/online_vs_trl.py --rounds 12 --repeats 3

Same model, prompts, reward (VADER) and work per step: B prompts, 2 sampled responses each,
scored, one DPO step on the B pairs. TRL: `trl.experimental.online_dpo.OnlineDPOTrainer` (the
benchmark may import it; the library never does) with a reward function. klalign:
`IterativeDPOTrainer` with enhancer best_vs_worst over 2 samples, one epoch on the latest round,
so one optimizer step per round. Like TRL with save_strategy "no", it checkpoints only at the end
(`save_every_rounds`), but it still stores every round's feedback and computes the per-round KL
to the reference (an extra policy and reference forward on the main agent's samples), which TRL
does not: that cost is counted. Runs alternate so a busy machine slows both alike; medians.
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from klalign import IterativeDPOConfig, IterativeDPOTrainer  # noqa: E402
from klalign.oracles import CallableReward  # noqa: E402
from klalign.rewards import vader_sentiment  # noqa: E402
from klalign.tiny import build_causal_lm, build_tokenizer, positivity_prompts  # noqa: E402

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
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
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
