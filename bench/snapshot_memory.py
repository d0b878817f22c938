"""Memory per process of Nash-MP's snapshots under 2-process ZeRO-3 on CPU: full gathered copies (before
issue 20) against each process's own partition (`klalign.models.snapshots` now).

    HF_HUB_OFFLINE=1 python bench/snapshot_memory.py              # prints the table
    ... python bench/snapshot_memory.py --repeats 3 --write docs/bench/snapshot_memory.md

A tiny Llama body (2 layers, hidden 64, 4 heads) with a Qwen-size vocabulary V = 151,936 and an untied
head, fp32, built under `deepspeed.zero.Init` and trained one step with AdamW under ZeRO-3 on 2 processes
(gloo, the shipped config's persistence threshold 640: the norms stay gathered, every other weight is
partitioned), then a no-grad forward pass and `engine.empty_partition_cache()` (DeepSpeed leaves every
parameter gathered after that forward; released, the baseline is the partitioned model and "held" is the
snapshots' own memory). Then, as `NLHFTrainer.update` does, theta_k (the anchor) and the half step's result
(the opponent) are snapshotted, and one snapshot is swapped in and out (`swapped`, as sampling the opponent or
reading pi_k's log-probs does). Variants:

- before: the code before issue 20, reproduced here: a snapshot gathers every parameter
  (`GatheredParameters`) and keeps a full clone; a swap snapshots the current weights the same way and
  writes full values through a gather with `modifier_rank=0`.
- after: `take_snapshot` / `swapped` now: each process copies its own partition (`param.ds_tensor`) and
  writes it back, no gather.

Memory is resident memory (VmRSS / VmHWM of each process, the high-water mark reset through
/proc/self/clear_refs before each phase), with glibc's mmap threshold fixed at 64 KiB
(MALLOC_MMAP_THRESHOLD_) so that a freed tensor leaves the resident set at once. Columns: "held" =
VmRSS after the phase - VmRSS before (what the snapshots keep), "peak" = VmHWM - VmRSS before (including
the gathers' transient full buffers); "tensors" = the bytes of the snapshots' tensors. Every variant runs in
fresh processes (one `accelerate launch` each), alternated over `--repeats`; medians over repeats, the
larger of the two processes. A benchmark, never a test.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from logprob_memory import status_kib  # (one copy; the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("before", "after")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS


def measured(fn):
    """(fn's result, held MiB, peak MiB, seconds) of one call."""
    import gc

    gc.collect()
    reset_peak()
    before = status_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, (status_kib("VmRSS") - before) / 1024, (status_kib("VmHWM") - before) / 1024, seconds


# ----------------------------------------------------------------------------- the code before issue 20


def legacy_take(model):
    """take_snapshot(model) before issue 20: full values, gathered on every process."""
    from klalign.models.placement import gathered

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered([p for _, p in params]):
        return {name: p.detach().clone() for name, p in params}


def legacy_load(model, state):
    import torch

    from klalign.models.placement import gathered

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered([p for _, p in params], modify=True), torch.no_grad():
        for name, p in params:
            p.copy_(state[name])


def legacy_swap(model, state):
    current = legacy_take(model)
    legacy_load(model, state)
    legacy_load(model, current)


# ----------------------------------------------------------------------------- one launch


def worker(variant: str, out: Path, vocab: int) -> None:
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from klalign.models.snapshots import swapped, take_snapshot

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 640},
                 "zero_force_ds_cpu_optimizer": False}
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=ds_config)
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    with torch.no_grad():
        engine(input_ids=ids)  # a log-prob pass, as between inner steps
    # After a no-grad forward that follows a training step DeepSpeed leaves every parameter gathered here (its
    # trace expects a backward pass to reuse them). The old snapshot's gather released them as a side effect,
    # which would count as memory the snapshot freed: start both variants from the partitioned model.
    engine.empty_partition_cache()

    take = legacy_take if variant == "before" else take_snapshot
    (anchor, opponent), held, peak, seconds = measured(lambda: (take(model), take(model)))
    tensors = sum(t.numel() * t.element_size() for s in (anchor, opponent) for t in s.values()) / 2**20

    def swap():
        if variant == "before":
            legacy_swap(model, anchor)
        else:
            with swapped(model, anchor):
                pass

    _, swap_held, swap_peak, swap_seconds = measured(swap)
    full_mib = sum(p.ds_numel for p in model.parameters()) * 4 / 2**20
    result = dict(variant=variant, rank=rank, held=held, peak=peak, tensors=tensors, seconds=seconds,
                  swap_peak=swap_peak, swap_held=swap_held, swap_seconds=swap_seconds, full_copy_mib=full_mib,
                  parameters=sum(p.ds_numel for p in model.parameters()))
    (out / f"{variant}-rank{rank}.json").write_text(json.dumps(result))


def launch(variant: str, out: Path, vocab: int) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu_zero3.yaml",
           __file__, "--worker", variant, "--out", str(out), "--vocab", str(vocab)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"{variant}-rank{r}.json").read_text()) for r in (0, 1)]


def table(runs: dict[str, list[list[dict]]], vocab: int) -> str:
    """Medians over repeats of the larger value of the two processes."""
    def med(variant, key):
        return statistics.median(max(r[key] for r in ranks) for ranks in runs[variant])

    full = runs["before"][0][0]["full_copy_mib"]
    rows = [
        ("anchor + opponent: snapshot tensors (MiB)", "tensors"),
        ("anchor + opponent: held after taking them (MiB)", "held"),
        ("anchor + opponent: peak while taking them (MiB)", "peak"),
        ("swap one in and out: peak (MiB)", "swap_peak"),
        ("taking both (s)", "seconds"),
        ("swap in and out (s)", "swap_seconds"),
    ]
    lines = [f"Tiny Llama, V = {vocab:,} (untied head), {runs['before'][0][0]['parameters']:,} parameters: "
             f"{full:.1f} MiB per full fp32 copy; 2 processes, ZeRO-3, CPU (gloo). Per process, the larger of the "
             f"two; median over {len(runs['before'])} repeats (fresh processes, variants alternated).", "",
             "| per process | before (full gathered copies) | after (own partition) | after / before |",
             "|---|---|---|---|"]
    for label, key in rows:
        b, a = med("before", key), med("after", key)
        digits = 2 if "(s)" in label else 1
        lines.append(f"| {label} | {b:.{digits}f} | {a:.{digits}f} | {a / b:.2f}x |" if b else f"| {label} | {b} | {a} | - |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--write", default="", help="also write the table to this markdown file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.out), args.vocab)
        return 0
    load_start = os.getloadavg()
    runs = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in (VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]):
                out = Path(tmp) / f"{variant}-{repeat}"
                out.mkdir()
                runs[variant].append(launch(variant, out, args.vocab))
                print(f"repeat {repeat} {variant}: " + ", ".join(
                    f"rank {r['rank']} held {r['held']:.1f} peak {r['peak']:.1f} swap peak {r['swap_peak']:.1f} MiB"
                    for r in runs[variant][-1]), flush=True)
    text = table(runs, args.vocab)
    load_end = os.getloadavg()
    text += (f"\n\nLoad average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load_start)}, at end "
             f"{'/'.join(f'{x:.2f}' for x in load_end)}.")
    print("\n" + text)
    if args.write:
        header = ("# Nash snapshots under ZeRO-3: memory per process (issue 20)\n\n"
                  "`HF_HUB_OFFLINE=1 python bench/snapshot_memory.py --repeats 3 --write docs/bench/snapshot_memory.md`"
                  "\n\nSee the script's docstring for what each column measures. Memory is the measure here; the "
                  "machine was shared with other jobs (load below), so the times only say that the local copies take "
                  "no gather.\n\n")
        Path(args.write).write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
