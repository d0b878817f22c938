"""Peak memory of HF sampling with the sampler's log-probs (`hf_sample(..., sampler_logprobs=True)`):
klalign's recorder against the old `output_scores` path, at a Qwen-size vocabulary.

    HF_HUB_OFFLINE=1 python bench/sampler_logprob_memory.py
    ... python bench/sampler_logprob_memory.py --sizes 16x256 32x256 64x128 --repeats 1

`sampler_logprobs` is on whenever HF samples at a temperature or top_p other than 1, or with importance
correction, and in the online trainers at temperature 1 on an fp32 policy (the kept log-probs replace the frozen
policy pass, issue 22, item 2: `OnlineTrainer.policy_token_logprobs`). The old path asked `generate` for `output_scores`, which keeps every step's processed scores
to the end: B x T x V fp32 (~20 GB at 64 x 512 x 152k); the new one (`SampledTokenLogprobs`) keeps one
step's (B x V) and turns it into the sampled token's log-prob at the next step. The old path is kept
here only (`old_hf_sample`, a copy of the code it replaced), so both run side by side in one run.

A tiny Llama body (2 layers, hidden 64, untied head) with V = 151,936, fp32, CPU, temperature 0.7,
top_p 0.9, EOS suppressed (every row runs T steps: the worst case), num_samples 1 per prompt, B prompts
of 8 tokens. Each measurement runs in a fresh process: build, warm up with a short call, reset the
resident high-water mark (`/proc/self/clear_refs`), read VmRSS, sample, read VmHWM; peak extra resident
memory = VmHWM - VmRSS before. Both paths are seeded alike, so they must draw the same tokens and give the
same log-probs: checked per size (max |new - old| over every token). A benchmark, never a test.
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from logprob_memory import status_kib  # noqa: E402 (one copy; the script's folder is on sys.path)


def build(vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from klalign.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    def no_eos(module, inputs, logits):  # EOS is never sampled: every row samples T tokens
        logits[..., tokenizer.eos_token_id] = float("-inf")

    model.lm_head.register_forward_hook(no_eos)
    return model, tokenizer


def prompts(batch: int) -> list[str]:
    words = ["the", "weather", "was", "great", "and", "my", "day", "long"]
    return [" ".join(words[(i + j) % len(words)] for j in range(8)) for i in range(batch)]


def old_hf_sample(model, tokenizer, prompts, num_samples, args):
    """The path `SampledTokenLogprobs` replaced (klalign before issue 20), kept here for the comparison:
    `generate(output_scores=True)` keeps every step's processed scores, (B, V) fp32 per step."""
    import torch

    from klalign.data.prompts import prompt_token_ids
    from klalign.generation.hf import (
        sampling_config,
        stop_token_ids,
        strip_after_stop,
        without_checkpoint_defaults,
    )
    from klalign.generation.types import Completion
    from klalign.ops.batching import left_padded

    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    flat = [(p, i) for p, i in zip(prompts, ids) for _ in range(num_samples)]
    stop_ids = stop_token_ids(model, tokenizer)
    config = sampling_config(args, stop_ids, tokenizer.pad_token_id)
    config.output_scores = config.return_dict_in_generate = True
    done = []
    with torch.no_grad(), without_checkpoint_defaults(model):
        for start in range(0, len(flat), args.generation_batch_size):
            chunk = flat[start : start + args.generation_batch_size]
            enc = left_padded([i for _, i in chunk], tokenizer.pad_token_id, next(model.parameters()).device)
            out = model.generate(**enc, generation_config=config)
            new = out.sequences[:, enc["input_ids"].size(1) :]
            step_logps = torch.stack([torch.log_softmax(step.float(), dim=-1).gather(-1, new[:, t : t + 1]).squeeze(-1)
                                      for t, step in enumerate(out.scores)], dim=1).tolist()
            for j, ((prompt, prompt_ids), generated) in enumerate(zip(chunk, new.tolist())):
                completion_ids = strip_after_stop(generated, stop_ids)
                done.append(Completion(prompt, prompt_ids, completion_ids, "", step_logps[j][: len(completion_ids)]))
    return done


def sample(variant: str, model, tokenizer, batch: int, length: int):
    from klalign.generation.hf import hf_sample
    from klalign.generation.types import GenerationArguments

    args = GenerationArguments(temperature=0.7, top_p=0.9, max_new_tokens=length, generation_batch_size=batch)
    if variant == "old":
        return old_hf_sample(model, tokenizer, prompts(batch), 1, args)
    return hf_sample(model, tokenizer, prompts(batch), 1, args, progress=False, sampler_logprobs=True)


def child(variant: str, vocab: int, batch: int, length: int, dump: str) -> dict:
    import gc

    import torch

    model, tokenizer = build(vocab)
    sample(variant, model, tokenizer, 2, 4)  # warm-up: one-time allocations
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    torch.manual_seed(1)
    start = time.perf_counter()
    done = sample(variant, model, tokenizer, batch, length)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    with open(dump, "w") as f:
        json.dump([[c.completion_ids, c.sampler_logprobs] for c in done], f)
    return {"peak_extra_mib": (peak - before) / 1024, "seconds": seconds, "threads": torch.get_num_threads(),
            "tokens": sum(len(c.completion_ids) for c in done)}


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["16x256", "32x256", "64x128"], help="B x T (new tokens).")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="runs/sampler_logprob_memory", help="Folder for the children's samples.")
    parser.add_argument("--output", default="", help="Also write the table to this markdown file.")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "B", "T", "DUMP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, batch, length, dump = args.child
        print("RESULT " + json.dumps(child(variant, args.vocab, int(batch), int(length), dump)))
        return
    os.makedirs(args.out, exist_ok=True)
    start_load = load_avg()
    rows = []
    for size in args.sizes:
        batch, length = (int(x) for x in size.split("x"))
        runs = {"old": [], "new": []}
        for r in range(args.repeats):
            for variant in ("old", "new"):
                dump = os.path.join(args.out, f"{variant}-{size}-{r}.json")
                cmd = [sys.executable, __file__, "--vocab", str(args.vocab), "--child", variant, str(batch), str(length),
                       dump]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(proc.stderr[-3000:])
                runs[variant].append(json.loads(line[len("RESULT "):]) | {"dump": dump})
                res = runs[variant][-1]
                print(f"  {size} {variant}: peak extra {res['peak_extra_mib']:.0f} MiB, {res['seconds']:.1f} s "
                      f"(load {load_avg()})", flush=True)
        old, new = (json.load(open(runs[v][0]["dump"])) for v in ("old", "new"))
        same_tokens = [o[0] for o in old] == [n[0] for n in new]
        diff = max(abs(a - b) for o, n in zip(old, new) for a, b in zip(o[1], n[1])) if same_tokens else float("nan")
        med = {v: (statistics.median(x["peak_extra_mib"] for x in rs), statistics.median(x["seconds"] for x in rs))
               for v, rs in runs.items()}
        rows.append({"B": batch, "T": length, "scores_mib": batch * length * args.vocab * 4 / 2**20, "old": med["old"],
                     "new": med["new"], "same_tokens": same_tokens, "max_diff": diff,
                     "tokens": runs["new"][0]["tokens"], "threads": runs["new"][0]["threads"]})
    lines = [
        f"`hf_sample(..., sampler_logprobs=True)` on a tiny Llama (2 layers, hidden 64, untied head), V = {args.vocab:,}, "
        f"fp32, CPU, {rows[0]['threads']} torch threads, temperature 0.7, top_p 0.9, every row running T steps. Peak "
        f"extra RSS = VmHWM - VmRSS before the call, each run in a fresh process after a warm-up; median of "
        f"{args.repeats} run(s) per path. Load average at start {start_load}, at end {load_avg()}.",
        "",
        "| B | T | B x T x V fp32 (MiB) | old: output_scores, peak extra RSS (MiB) | new: recorder (MiB) | new / old | "
        "time old / new (s) | same tokens, max abs diff of log-probs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['B']} | {r['T']} | {r['scores_mib']:.0f} | {r['old'][0]:.0f} | {r['new'][0]:.0f} | "
                     f"{r['new'][0] / r['old'][0]:.3f}x | {r['old'][1]:.1f} / {r['new'][1]:.1f} | "
                     f"{'yes' if r['same_tokens'] else 'NO'}, {r['max_diff']:.1e} |")
        if r["tokens"] != r["B"] * r["T"]:
            lines[-1] += f" (only {r['tokens']} of {r['B'] * r['T']} tokens sampled: rows stopped early)"
    table = "\n".join(lines)
    print("\n" + table)
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            f.write("# Sampler log-prob peak memory, recorder vs output_scores (issue 20)\n\n"
                    f"`python {' '.join(sys.argv)}`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
