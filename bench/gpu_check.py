"""One command that checks klalign on a GPU: every recipe for a few steps or rounds on a ~0.7B Llama
built from a config in bf16 (a reward model and an LM judge built the same way), under single-GPU
DeepSpeed ZeRO-3 bf16 (the settings of configs/accelerate/zero3.yaml, one process) and under plain bf16.

    python bench/gpu_check.py                  # on a machine with a CUDA GPU; about 6 minutes on an H200
    python bench/gpu_check.py --smoke          # the same plumbing on CPU with tiny models (fp32), a minute or two

No downloads: the tokenizer is trained in-process and the models are built from configs. Prints one
table: recipe, launch mode, ok/failed, tokens/s, peak GPU memory, and the DPO step's model FLOPs
utilisation. tokens/s counts, per recipe: DPO and RSO's training, tokens trained on per second of
training; the online recipes and evaluation, sampled response tokens per second of the whole run.
Two rows measure the lean log-prob path against full (B, T, V) logits at a Qwen-size vocabulary
(V = 151,936, T = 1024): tokens/s and peak GPU memory. One row pushes a bf16 LoRA policy (the check's
policy, B ~ N(0, 0.02)) to vLLM 100 times as `hf_weights` does (no engine needed) and checks that the base
weights stay bit-identical, beside the share of them that PEFT's in-place merge/unmerge (the old push)
changes. Two rows sample with the sampler's log-probs at V = 151,936 (B = 64, T = 512): peak GPU memory
of klalign's recorder against the old `output_scores` path (B x T x V fp32 kept), same tokens and
log-probs. One row samples 64 x 512 tokens with a bf16 copy of a peaked model (vLLM's usual dtype) and
scores them with the fp32 model: the per-token mismatch, the share of tokens and of sequences whose
importance ratio passes the cap, and the sequence weights' effective sample size (token- against
sequence-level truncated importance sampling). The last row checks that Nash-MP under ZeRO-3 bf16 keeps updates smaller than half a bf16 ulp
(the fp32 master weights must keep drifting round after round instead of being reset to bf16 values).

    python bench/gpu_check.py --only push sampler importance   # just those rows (about a minute on a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H200_BF16_FLOPS = 989e12  # dense bf16 peak of an H100/H200 SXM, FLOP/s


# ----------------------------------------------------------------------------- measuring one launch


def measured_run(report: str, script: str, argv: list[str]) -> None:
    """Run `script` as __main__ with `argv`; rank 0 writes wall time and peak GPU memory to `report`."""
    import atexit

    import torch

    start = time.time()

    def write():
        if int(os.environ.get("RANK", "0")) == 0:
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
            Path(report).write_text(json.dumps({"wall_s": time.time() - start, "peak_gib": peak}))

    atexit.register(write)
    if script == "-m":  # a module, as `python -m`
        sys.argv = argv
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = [script, *argv]
        runpy.run_path(script, run_name="__main__")


# ----------------------------------------------------------------------------- building the models


def build_models(out: Path, smoke: bool) -> dict[str, str]:
    """Policy (also the judge) and reward model folders, bf16 on GPU (fp32 for the smoke run)."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    from klalign.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
            if smoke else
            dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4))
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **size)
    dtype = torch.float32 if smoke else torch.bfloat16
    paths = {}
    for name, cls, labels in (("policy", LlamaForCausalLM, None), ("reward", LlamaForSequenceClassification, 1)):
        folder = out / "models" / name
        if not (folder / "config.json").exists():
            torch.manual_seed(0)
            model_config = config.__class__(**{**config.to_dict(), **({"num_labels": labels} if labels else {})})
            model = cls(model_config).to(dtype)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            del model
        paths[name] = str(folder)
    paths["num_params"] = _count_params(config)
    return paths


def _count_params(config) -> int:
    h, i, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    return L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * V * h + h


# ----------------------------------------------------------------------------- the launch modes and recipes


def accelerate_configs(out: Path, smoke: bool) -> dict[str, tuple[str, list[str]]]:
    """{mode: (accelerate config file, extra recipe arguments)} for ZeRO-3 bf16 and plain bf16, one process."""
    import yaml

    zero3 = yaml.safe_load((ROOT / "configs/accelerate/zero3.yaml").read_text())
    zero3.update(num_processes=1)
    plain = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "num_machines": 1,
             "num_processes": 1, "mixed_precision": "bf16", "use_cpu": False}
    extra = ["--bf16", "true", "--use_cpu", "false"]  # bf16 in configs/deepspeed/zero3.json follows --bf16
    if smoke:  # CPU: no bf16; DeepSpeed on CPU wants gloo (STACK.md)
        zero3.update(use_cpu=True)
        plain.update(mixed_precision="no", use_cpu=True)
        extra = ["--bf16", "false"]
    files = {}
    for name, config in (("zero3_bf16", zero3), ("bf16", plain)):
        path = out / f"accelerate_{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        files[name] = str(path)
    ds_extra = ["--use_cpu", "false", "--ddp_backend", "gloo"] if smoke else []
    return {"zero3_bf16": (files["zero3_bf16"], extra + ds_extra), "bf16": (files["bf16"], extra)}


def recipes(models: dict, run: Path, smoke: bool) -> dict[str, list[str]]:
    """Each recipe's script and arguments: the tiny configs with the built models and a few steps."""
    dtype = "float32" if smoke else "bfloat16"
    common = ["--model_name_or_path", models["policy"], "--dtype", dtype, "--report_to", "none",
              "--gradient_checkpointing", "false", "--save_strategy", "no"]
    online = ["--num_rounds", "2", "--prompts_per_round", "16", "--prompts_per_chunk", "16", "--max_new_tokens", "32",
              "--per_device_train_batch_size", "8", "--generation_batch_size", "64", "--save_total_limit", "1"]
    return {
        "dpo": ["recipes/dpo.py", "--config", "configs/tiny/dpo.yaml", *common, "--max_steps", "8",
                "--per_device_train_batch_size", "8", "--max_length", "128", "--logging_steps", "1",
                "--output_dir", str(run / "dpo")],
        "rso": ["recipes/rso.py", "--config", str(run / "rso.yaml"), *common, "--num_candidates", "8",
                "--max_new_tokens", "32", "--max_steps", "4", "--per_device_train_batch_size", "8",
                "--output_dir", str(run / "rso")],
        "iterative_dpo": ["recipes/iterative_dpo.py", "--config", str(run / "iterative_dpo.yaml"), *common, *online,
                          "--output_dir", str(run / "iterative_dpo")],
        "optimistic_kl": ["recipes/optimistic_kl.py", "--config", str(run / "optimistic_kl.yaml"), *common, *online,
                          "--feature_map", "reward_model", "--output_dir", str(run / "optimistic_kl")],
        "nash_mp": ["recipes/nash_mp.py", "--config", str(run / "nash_mp.yaml"), *common, *online,
                    "--inner_steps", "2", "--win_rate_prompts", "16", "--output_dir", str(run / "nash_mp")],
        # Not a training script: no training arguments are appended (see EVALUATION).
        "evaluate": ["-m", "klalign.cli", "evaluate", "--config", "configs/tiny/evaluate.yaml",
                     "--checkpoints", str(run / "dpo"), "--reference_model_path", models["policy"],
                     "--dtype", dtype, "--num_samples", "8", "--best_of_n_max", "4", "--max_prompts", "16", "--max_new_tokens", "32",
                     "--output_dir", str(run / "evaluate")],
    }


EVALUATION = {"evaluate"}  # entries of `recipes` that take no training arguments


def write_configs(models: dict, run: Path) -> None:
    """The tiny configs with a reward model (RSO, GSHF, optimistic) or the LM judge (Nash-MP) as the oracle."""
    import yaml

    run.mkdir(parents=True, exist_ok=True)
    for name, oracle in (("rso", {"reward_model_path": models["reward"]}),
                         ("iterative_dpo", {"reward_model_path": models["reward"]}),
                         ("optimistic_kl", {"reward_model_path": models["reward"]}),
                         ("nash_mp", {"judge_model_path": models["policy"], "feedback": "preference"})):
        config = yaml.safe_load((ROOT / f"configs/tiny/{name}.yaml").read_text())
        config.pop("reward_fn", None)
        config.pop("bradley_terry_temperature", None)
        config.update(oracle)
        (run / f"{name}.yaml").write_text(yaml.safe_dump(config))


# ----------------------------------------------------------------------------- reading the results


def tokens_per_second(recipe: str, out: Path, wall: float) -> float:
    """See the module docstring for what is counted."""
    if recipe == "evaluate":
        table = json.loads((out / "tradeoff.json").read_text())
        rows = [table["reference"], *table["checkpoints"]]
        settings = table["settings"]
        return sum(r["response_tokens"] for r in rows) * settings["num_prompts"] * settings["num_samples"] / wall
    if recipe in ("dpo", "rso"):
        state = json.loads((out / "trainer_state.json").read_text())
        tokens = max((h["num_tokens"] for h in state["log_history"] if "num_tokens" in h), default=0)
        runtime = next((h["train_runtime"] for h in state["log_history"] if "train_runtime" in h), wall)
        return tokens / runtime
    from klalign.runs.feedback import FeedbackStore

    rows = FeedbackStore(out / "feedback", read_only=True).dataset().to_list()
    keys = ("completion_ids", "chosen_ids", "rejected_ids")
    count = 0
    for row in rows:
        for key in keys:
            ids = row.get(key)
            if ids:
                count += sum(len(x) for x in ids) if isinstance(ids[0], list) else len(ids)
    return count / wall


def dpo_mfu(out: Path, num_params: int, peak_flops: float) -> float:
    """Model FLOPs utilisation of the DPO steps: (6 N for the policy's forward and backward + 2 N for the
    reference's forward) per trained token, over the training time, against the GPU's bf16 peak."""
    state = json.loads((out / "trainer_state.json").read_text())
    tokens = max(h["num_tokens"] for h in state["log_history"] if "num_tokens" in h)
    runtime = next(h["train_runtime"] for h in state["log_history"] if "train_runtime" in h)
    return 8 * num_params * tokens / runtime / peak_flops


def master_drift_check(run: Path, models: dict, mode: tuple[str, list[str]], env: dict) -> tuple[str, str]:
    """Nash-MP, ZeRO-3 bf16, lr 1e-6 (updates far below half a bf16 ulp of weights ~0.02): the fp32
    masters' distance from theta_0 must grow with the rounds (it stays at one round's worth if each
    reset to theta_k rounds the masters to bf16)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    initial = {k: v.float() for k, v in load_file(str(Path(models["policy"]) / "model.safetensors")).items()}
    out = run / "nash_drift"
    config, extra = mode
    argv = ["recipes/nash_mp.py", "--config", str(run / "nash_mp.yaml"), "--model_name_or_path", models["policy"],
            "--dtype", "bfloat16", "--report_to", "none", "--num_rounds", "3", "--prompts_per_round", "8",
            "--prompts_per_chunk", "8", "--max_new_tokens", "16", "--inner_steps", "2", "--win_rate_prompts", "0",
            "--learning_rate", "1e-6", "--lr_scheduler_type", "constant", "--max_grad_norm", "0",
            "--save_total_limit", "3", "--output_dir", str(out), *extra]
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *argv],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600)
    drift = []
    for r in range(3):
        masters = get_fp32_state_dict_from_zero_checkpoint(str(out / f"checkpoint-round-{r:05d}"))
        drift.append(sum((masters[k].float() - initial[k]).norm().item() ** 2 for k in initial if k in masters) ** 0.5)
    ok = drift[2] > 2.0 * drift[0] > 0
    return ("ok" if ok else "FAILED"), "master drift by round: " + ", ".join(f"{d:.3g}" for d in drift)


def lean_logprob_rows(smoke: bool) -> list[dict]:
    """One forward+backward of the log-prob path on a 2-layer body with a Qwen-size vocabulary (V = 151,936,
    T = 1024, B = 4; smoke: V = 32,000, T = 128): tokens/s and peak GPU memory, lean (klalign's default) and
    full (B, T, V) logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from klalign.ops.logprobs import sequence_logprobs

    vocab, length, batch = (32_000, 128, 2) if smoke else (151_936, 1024, 4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(vocab_size=vocab, hidden_size=896, intermediate_size=1792, num_hidden_layers=2,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.float32 if smoke else torch.bfloat16)
    ids = torch.randint(0, vocab, (batch, length), device=device)
    mask = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, length // 8 :] = 1  # a short prompt, a long completion
    rows = []
    for lean in (True, False):
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.time()
        sequence_logprobs(model, ids, mask, completion, lean=lean).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        rows.append({"recipe": f"log-probs {'lean' if lean else 'full logits'}", "mode": f"V={vocab} T={length}",
                     "status": "ok", "tokens/s": f"{batch * length / seconds:.0f}", "peak GiB": f"{peak:.2f}",
                     "MFU": "", "note": f"B={batch}, forward+backward"})
    return rows


def lora_push_rows(models: dict, smoke: bool, pushes: int = 100) -> list[dict]:
    """The policy in bf16 with a LoRA (r 8, all linear layers, B ~ N(0, 0.02)), pushed `pushes` times through
    `hf_weights` (each push consumed fully, as vLLM's reload does): the base weights must stay bit-identical.
    The old push (PEFT's merge_adapter / unmerge_adapter in place) on a second copy, for the drift it gives."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from klalign.generation.vllm_engine import hf_weights

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def lora_policy():
        model = AutoModelForCausalLM.from_pretrained(models["policy"], dtype=torch.bfloat16).to(device)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        return model

    def changed(model, before) -> float:
        params = dict(model.named_parameters())
        return sum((params[n] != b).sum().item() for n, b in before.items()) / sum(b.numel() for b in before.values())

    rows = []
    for path in ("new", "old"):
        model = lora_policy()
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        start = time.time()
        with torch.no_grad():
            for _ in range(pushes):
                if path == "new":
                    for _name, tensor in hf_weights(model):
                        tensor.sum()  # read, as vLLM's loader does
                else:
                    model.merge_adapter()
                    for _name, p in model.named_parameters():
                        p.sum()
                    model.unmerge_adapter()
        if device == "cuda":
            torch.cuda.synchronize()
        rate = pushes / (time.time() - start)
        fraction = changed(model, before)
        if path == "new":
            rows.append({"recipe": "LoRA push to vLLM", "mode": "bf16", "status": "ok" if fraction == 0 else "FAILED",
                         "tokens/s": "", "peak GiB": "", "MFU": "",
                         "note": f"{pushes} pushes ({rate:.1f}/s): base weights changed {fraction:.2%}"})
        else:
            rows[-1]["note"] += f"; old in-place merge/unmerge: {fraction:.2%}"
        del model, before
    return rows


def sampler_logprob_rows(smoke: bool) -> list[dict]:
    """`hf_sample(..., sampler_logprobs=True)` at V = 151,936, B = 64, T = 512 (smoke: V = 32,000, B = 8,
    T = 32), temperature 0.7, top_p 0.9, every row running T steps: peak GPU memory (smoke: peak extra RSS)
    of klalign's recorder and of the old `output_scores` path, which must draw the same tokens and give the
    same log-probs."""
    import gc

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from sampler_logprob_memory import build, old_hf_sample, prompts, status_kib

    from klalign.generation.hf import hf_sample
    from klalign.generation.types import GenerationArguments

    vocab, batch, length = (32_000, 8, 32) if smoke else (151_936, 64, 512)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = build(vocab)
    model.to(device)
    args = GenerationArguments(temperature=0.7, top_p=0.9, max_new_tokens=length, generation_batch_size=batch)
    results = {}
    for path in ("old", "new", "old", "new"):  # the first round warms up
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = status_kib("VmRSS") * 1024
        torch.manual_seed(1)
        start = time.time()
        if path == "old":
            done = old_hf_sample(model, tokenizer, prompts(batch), 1, args)
        else:
            done = hf_sample(model, tokenizer, prompts(batch), 1, args, progress=False, sampler_logprobs=True)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = status_kib("VmHWM") * 1024 - base
        results[path] = (done, peak, time.time() - start)
    (old, old_peak, old_s), (new, new_peak, new_s) = results["old"], results["new"]
    same = [c.completion_ids for c in old] == [c.completion_ids for c in new]
    diff = max(abs(a - b) for o, n in zip(old, new) for a, b in zip(o.sampler_logprobs, n.sampler_logprobs)) \
        if same else float("nan")
    tokens = sum(len(c.completion_ids) for c in new)
    # On CPU the heap keeps what the warm-up freed, so RSS peaks in one process are often 0 (the CPU numbers come
    # from fresh processes: bench/sampler_logprob_memory.py); the memory comparison is the GPU's.
    ok = same and diff <= 1e-5 and (new_peak < old_peak or device != "cuda")
    what = "peak extra GPU memory" if device == "cuda" else "peak extra RSS"
    mode = f"V={vocab} B={batch} T={length}"
    return [
        {"recipe": "sampler log-probs, old", "mode": mode, "status": "ok", "tokens/s": f"{tokens / old_s:.0f}",
         "peak GiB": f"{old_peak / 2**30:.2f}", "MFU": "",
         "note": f"output_scores: B x T x V fp32 = {batch * length * vocab * 4 / 2**30:.2f} GiB kept; {what}"},
        {"recipe": "sampler log-probs", "mode": mode, "status": "ok" if ok else "FAILED",
         "tokens/s": f"{tokens / new_s:.0f}", "peak GiB": f"{new_peak / 2**30:.2f}", "MFU": "",
         "note": f"recorder: {new_peak / max(old_peak, 1):.3f}x the old peak; same tokens: {'yes' if same else 'NO'}, "
                 f"max |log-prob diff| {diff:.1e}"},
    ]


def importance_rows(smoke: bool) -> list[dict]:
    """Token- against sequence-level truncated importance weights on long responses drawn by a bf16 copy of the
    training model (vLLM's usual dtype): B = 64 responses of T = 512 tokens (smoke: 16 x 64) from a peaked
    Llama (LM head x 20) at V = 151,936 (smoke: 32,000), scored by the fp32 model. Reports the per-token
    mismatch, the fractions of tokens and of sequences whose ratio exceeds the cap (2), and the sequence
    weights' effective sample size: the sequence form collapses where the token form does not."""
    import copy

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from sampler_logprob_memory import build, prompts

    from klalign.generation.hf import hf_sample
    from klalign.generation.types import GenerationArguments
    from klalign.ops.batching import completion_batch
    from klalign.ops.importance import at_scored_positions, importance_weights
    from klalign.ops.logprobs import token_logprobs

    vocab, batch, length = (32_000, 16, 64) if smoke else (151_936, 64, 512)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = build(vocab)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.to(device)
    sampler = copy.deepcopy(model).to(torch.bfloat16)
    args = GenerationArguments(max_new_tokens=length, generation_batch_size=batch)
    torch.manual_seed(0)
    done = hf_sample(sampler, tokenizer, prompts(batch), 1, args, progress=False, sampler_logprobs=True)
    data = completion_batch([c.prompt_ids for c in done], [c.completion_ids for c in done], tokenizer.pad_token_id,
                            device)
    with torch.no_grad():
        train = token_logprobs(model, **data).double()
    mask = data["completion_mask"][:, 1:]
    sampled = at_scored_positions([c.sampler_logprobs for c in done], data["completion_mask"]).to(device)
    logratio = (train - sampled) * mask
    seq = logratio.sum(1)
    w = (seq - seq.max()).exp()
    ess = (w.sum() ** 2 / (len(w) * (w**2).sum())).item()
    token_w = importance_weights(train, sampled, mask, "token", 2.0)
    clipped_tokens = ((logratio.exp() > 2.0) & mask.bool()).sum().item() / mask.sum().item()
    clipped_sequences = (seq.exp() > 2.0).double().mean().item()
    mismatch = (logratio.abs().sum() / mask.sum()).item()
    note = (f"bf16 sampler vs fp32 model: mismatch {mismatch:.3f} nats/token; clipped at cap 2: tokens "
            f"{clipped_tokens:.1%}, sequences {clipped_sequences:.1%}; sequence-weight ESS {ess:.1%} of the samples; "
            f"token weights in [{token_w[mask.bool()].min().item():.2f}, {token_w[mask.bool()].max().item():.2f}]")
    return [{"recipe": "importance weights", "mode": f"bf16 V={vocab} B={batch} T={length}", "status": "ok",
             "tokens/s": "", "peak GiB": "", "MFU": "", "note": note}]


# ----------------------------------------------------------------------------- the driver


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, fp32: check the plumbing here.")
    parser.add_argument("--out", default="runs/gpu_check", help="Where models, runs and the table go.")
    parser.add_argument("--peak_flops", type=float, default=H200_BF16_FLOPS, help="The GPU's bf16 peak, FLOP/s.")
    parser.add_argument("--timeout", type=int, default=300, help="Seconds per recipe launch.")
    parser.add_argument("--only", nargs="+", choices=["recipes", "logprobs", "push", "sampler", "importance", "nash"],
                        help="Run only these groups of rows (default: all).")
    args = parser.parse_args()
    groups = set(args.only or ["recipes", "logprobs", "push", "sampler", "importance", "nash"])
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --smoke for the CPU plumbing check", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "KLALIGN_CACHE": str(out / "cache"), "PYTHONPATH": str(ROOT)}
    started = time.time()
    models = build_models(out, args.smoke)
    modes = accelerate_configs(out, args.smoke)
    rows = []
    for mode, (config, extra) in modes.items() if "recipes" in groups else ():
        run = out / mode
        write_configs(models, run)
        for recipe, argv in recipes(models, run, args.smoke).items():
            report = run / f"{recipe}.report.json"
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, __file__,
                   "--measure", str(report), *argv, *([] if recipe in EVALUATION else extra)]
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
                ok = proc.returncode == 0
                tail = "" if ok else (proc.stderr.strip().splitlines() or ["?"])[-1][:90]
            except subprocess.TimeoutExpired:
                ok, tail = False, f"timed out after {args.timeout} s"
            row = {"recipe": recipe, "mode": mode, "status": "ok" if ok else "FAILED", "tokens/s": "", "peak GiB": "",
                   "MFU": "", "note": tail}
            if ok:
                measured = json.loads(report.read_text())
                row["peak GiB"] = f"{measured['peak_gib']:.1f}"
                row["note"] = f"{measured['wall_s']:.0f} s"
                try:
                    row["tokens/s"] = f"{tokens_per_second(recipe, run / recipe, measured['wall_s']):.0f}"
                    if recipe == "dpo" and not args.smoke:
                        row["MFU"] = f"{dpo_mfu(run / recipe, models['num_params'], args.peak_flops):.1%}"
                except (OSError, KeyError, ValueError, StopIteration) as error:  # the run is fine; its numbers are not
                    row["note"] += f"; metrics unreadable: {error!r}"[:120]
            rows.append(row)
            print(f"{recipe:>14} {mode:>10} {row['status']}", flush=True)
    if "logprobs" in groups:
        rows += lean_logprob_rows(args.smoke)
    if "push" in groups:
        rows += lora_push_rows(models, args.smoke)
    if "sampler" in groups:
        rows += sampler_logprob_rows(args.smoke)
    if "importance" in groups:
        rows += importance_rows(args.smoke)
    if not args.smoke and "nash" in groups:
        write_configs(models, out / "zero3_bf16")
        status, note = master_drift_check(out / "zero3_bf16", models, modes["zero3_bf16"], env)
        rows.append({"recipe": "nash_mp sub-ulp", "mode": "zero3_bf16", "status": status, "tokens/s": "",
                     "peak GiB": "", "MFU": "", "note": note})
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke)"
    print(f"\nklalign GPU check on {device}: policy {models['num_params'] / 1e6:,.1f}M parameters, "
          f"{time.time() - started:.0f} s in all\n")
    columns = ["recipe", "mode", "status", "tokens/s", "peak GiB", "MFU", "note"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        measured_run(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(main())
