"""klalign.DPOTrainer against trl.DPOTrainer: training steps per second on the same model and batches.

    python bench/dpo_vs_trl.py                 # tiny Llama (hidden 256, 4 layers), CPU
    python bench/dpo_vs_trl.py --steps 40 --repeats 3 --hidden 256

Both trainers get the same initial weights, reference, data, batch size and seed, so they see the
same batches. Runs alternate (TRL, klalign, TRL, ...) so a busy machine slows both alike; the table
gives the median steps/s of each configuration and its ratio to TRL's. A benchmark, never a test.
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-thread torch is erratic when anything else runs (STACK.md)

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402

from klalign import DPOConfig, DPOTrainer  # noqa: E402
from klalign.tiny import build_causal_lm, build_tokenizer, positivity_preferences  # noqa: E402


def steps_per_second(trainer_cls, config_cls, args, tokenizer, data, **config) -> float:
    policy = build_causal_lm(tokenizer, hidden_size=args.hidden, num_layers=args.layers, seed=0)
    reference = build_causal_lm(tokenizer, hidden_size=args.hidden, num_layers=args.layers, seed=0)
    trainer = trainer_cls(
        model=policy,
        ref_model=None if config.get("precompute_ref_log_probs") else reference,
        args=config_cls(
            output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4, bf16=False, use_cpu=True, report_to=[], gradient_checkpointing=False,
            save_strategy="no", logging_steps=args.steps, max_length=128, seed=0, **config,
        ),
        train_dataset=data,
        processing_class=tokenizer,
    )
    start = time.perf_counter()  # the reference precompute, if any, happened at construction: count it too
    trainer.train()
    return args.steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    data = Dataset.from_list(positivity_preferences(args.steps * args.batch_size, seed=0))
    runs = {
        "trl.DPOTrainer": (trl.DPOTrainer, trl.DPOConfig, {}),
        "klalign.DPOTrainer": (DPOTrainer, DPOConfig, {}),
        "trl.DPOTrainer + precompute_ref": (trl.DPOTrainer, trl.DPOConfig, {"precompute_ref_log_probs": True}),
        "klalign.DPOTrainer + precompute_ref": (DPOTrainer, DPOConfig, {"precompute_ref_log_probs": True}),
    }
    results = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (trainer_cls, config_cls, config) in runs.items():
            results[name].append(steps_per_second(trainer_cls, config_cls, args, tokenizer, data, **config))
    base = statistics.median(results["trl.DPOTrainer"])
    params = sum(p.numel() for p in build_causal_lm(tokenizer, args.hidden, args.layers).parameters())
    print(f"\nDPO steps/s, tiny Llama {params / 1e6:.2f}M params, batch {args.batch_size} pairs, "
          f"{args.steps} steps, median of {args.repeats}, torch threads {torch.get_num_threads()}, CPU")
    print("| trainer | steps/s (median) | runs | vs trl.DPOTrainer |")
    print("|---|---|---|---|")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
