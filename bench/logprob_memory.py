"""Peak memory of one forward+backward of the log-prob path: lean (chunked head) against full logits.

    KLALIGN_CACHE=/work/klalign-cache HF_HUB_OFFLINE=1 python bench/logprob_memory.py
    ... python bench/logprob_memory.py --batch-size 2 --seq-len 1024 --prompt-len 64 --repeats 3

`klalign.ops.logprobs.sequence_logprobs(model, ..., lean=True|False)` on a tiny Llama body (2 layers,
hidden 64, 4 heads) with a Qwen-size vocabulary V = 151,936 (untied head, like Qwen2.5-7B), B = 2,
T = 1024 of which 960 completion tokens: the (B, T, V) fp32 logits are ~1.2 GB, the body almost
nothing, so the head's memory is what is measured. `lean=False` is the plain path (the logits of the
completion positions, kept for backward); `lean=True` runs the head on chunks of 256 completion
positions under activation checkpointing. `--frozen-head` freezes the head, as LoRA leaves it, and adds the
lean path as it was before the frozen-head lever (each chunk's logits recomputed in backward, where klalign now
forms each position's gradient in the forward: `klalign.ops.logprobs._FrozenHeadLogprobs`).

Each measurement runs in a fresh subprocess: build the model and the batch, run one warm-up
forward+backward on a short batch (so that one-time allocations of torch and the allocator are not
counted), free it, then reset the resident high-water mark (`echo 5 > /proc/self/clear_refs`), read
VmRSS, run `sequence_logprobs(...).sum().backward()` once, and read VmHWM: the peak extra resident
memory is VmHWM minus VmRSS before. The time is that call's wall time. Variants alternate over
`--repeats` fresh processes; medians. Then, in this process, the two paths are checked to give the same
per-token log-probs (to 1e-5) and the same gradients. Load average is printed at start and end. A
benchmark, never a test.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

GOAL = 0.3  # issue 13: lean peak <= 0.3x full


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq_len,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    if args.frozen_head:
        model.lm_head.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, args.prompt_len :] = 1
    return model, dict(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)


def child(args, variant: str) -> dict:
    import gc

    import torch

    from klalign.ops import logprobs
    from klalign.ops.logprobs import sequence_logprobs

    lean = variant != "full"
    if variant == "recomputed":  # the frozen head on the checkpointed path, as before the lever
        logprobs._frozen_plain_head = lambda head: False

    model, batch = build(args)
    short = {k: v[:, :64].clone() for k, v in batch.items()}
    short["completion_mask"][:, 8:] = 1  # a short completion (the long batch's prompt covers these 64)
    sequence_logprobs(model, **short, lean=lean).sum().backward()  # warm-up: one-time allocations
    model.zero_grad(set_to_none=False)  # gradient buffers exist before and after: not counted
    del short
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    start = time.perf_counter()
    logps = sequence_logprobs(model, **batch, lean=lean)
    logps.sum().backward()
    elapsed = time.perf_counter() - start
    peak = status_kib("VmHWM")
    return {"lean": lean, "peak_extra_mib": (peak - before) / 1024, "rss_before_mib": before / 1024,
            "seconds": elapsed, "threads": torch.get_num_threads()}


def check_equal(args) -> dict:
    """Per-token log-probs and gradients of both paths on the same model and batch."""

    from klalign.ops.logprobs import token_logprobs

    model, batch = build(args)
    out = {}
    for lean in (False, True):
        model.zero_grad(set_to_none=True)
        tok = token_logprobs(model, **batch, lean=lean)
        tok.sum().backward()
        out[lean] = (tok.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    (full, g_full), (lean, g_lean) = out[False], out[True]
    grad_diff = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(g_lean, g_full))
    return {"token_max_abs_diff": (full - lean).abs().max().item(),
            "sequence_max_abs_diff": (full.sum(1) - lean.sum(1)).abs().max().item(),
            "sequence_logprob": full.sum(1).tolist(), "grad_max_rel_diff": grad_diff}


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frozen-head", action="store_true", help="the head frozen (LoRA): adds 'recomputed'")
    parser.add_argument("--child", choices=["lean", "full", "recomputed"])
    parser.add_argument("--output", default="docs/bench/logprob_memory.md")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args, args.child)))
        return
    start_load = load_avg()
    results = {"full": [], "lean": [], **({"recomputed": []} if args.frozen_head else {})}
    for _ in range(args.repeats):
        for variant in results:
            cmd = [sys.executable, __file__, "--child", variant] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("child", "output", "repeats", "frozen_head")] + (["--frozen-head"] if args.frozen_head else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(proc.stderr[-3000:])
            results[variant].append(json.loads(line[len("RESULT "):]))
            r = results[variant][-1]
            print(f"  {variant}: peak extra {r['peak_extra_mib']:.0f} MiB, {r['seconds']:.2f} s (load {load_avg()})",
                  flush=True)
    equal = check_equal(args)
    end_load = load_avg()
    med = {v: (statistics.median(r["peak_extra_mib"] for r in rs), statistics.median(r["seconds"] for r in rs))
           for v, rs in results.items()}
    completion = args.batch_size * (args.seq_len - args.prompt_len)
    logits_mib = completion * args.vocab * 4 / 2**20
    names = {"full": "full logits (lean=False)", "lean": "lean (lean=True, chunks of 256 positions)",
             "recomputed": "lean, the frozen head's logits recomputed in backward (before the frozen-head lever)"}
    if args.frozen_head:
        names["lean"] += ", frozen head: gradient formed in the forward"
    lines = [
        f"One forward+backward of klalign.ops.logprobs.sequence_logprobs on a tiny Llama body (2 layers, hidden 64) with "
        f"V = {args.vocab:,} (untied head{', frozen' if args.frozen_head else ''}), B = {args.batch_size}, T = {args.seq_len} ({args.seq_len - args.prompt_len} "
        f"completion tokens per row; their fp32 logits alone: {logits_mib:.0f} MiB), fp32, CPU, torch threads "
        f"{results['full'][0]['threads']}. Peak extra resident memory = VmHWM - VmRSS before the call (high-water mark "
        f"reset via /proc/self/clear_refs), each run in a fresh process after a short warm-up call; median of "
        f"{args.repeats} alternated runs. Load average (1/5/15 min) at start {start_load}, at end {end_load}.",
        "",
        "| path | peak extra RSS (MiB, median) | runs (MiB) | time (s, median) | runs (s) | peak vs full | goal <= 0.3x |",
        "|---|---|---|---|---|---|---|",
    ]
    def goal(v):
        return "-" if v == "full" else "met" if med[v][0] / med["full"][0] <= GOAL else "missed"

    for v in results:
        peaks = ", ".join(f"{r['peak_extra_mib']:.0f}" for r in results[v])
        secs = ", ".join(f"{r['seconds']:.2f}" for r in results[v])
        lines.append(f"| {names[v]} | {med[v][0]:.0f} | {peaks} | {med[v][1]:.2f} | {secs} | "
                     f"{med[v][0] / med['full'][0]:.2f}x | {goal(v)} |")
    lines += ["", f"Equality (same model and batch, in one process): per-token log-probs max |lean - full| = "
              f"{equal['token_max_abs_diff']:.2e} ({'within' if equal['token_max_abs_diff'] <= 1e-5 else 'OUTSIDE'} "
              f"1e-5); summed over a row's {args.seq_len - args.prompt_len} tokens: max |diff| = "
              f"{equal['sequence_max_abs_diff']:.2e} on s(y) = {', '.join(f'{x:.1f}' for x in equal['sequence_logprob'])}; "
              f"gradients: max relative difference {equal['grad_max_rel_diff']:.2e}."]
    table = "\n".join(lines)
    print("\n" + table)
    if args.output:
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as f:
            f.write("# Log-prob peak memory, lean vs full logits (issue 13)\n\n"
                    "`KLALIGN_CACHE=/work/klalign-cache HF_HUB_OFFLINE=1 python bench/logprob_memory.py`\n\n"
                    + table + "\n")


if __name__ == "__main__":
    main()
