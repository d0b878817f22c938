"""The run manifest: the settings that determine what a run collects, written beside what it collected.

Collected data (an online run's feedback store, an RSO pairs file, a best-of-N results file) is only
reused by the run that wrote it. Beside it, `manifest.json` records every setting that changes what
is collected: the models and adapters (content hashes), the oracle, the prompts (a hash), beta, the
sampling settings, the seed, the chunking, the trainer and all its method and optimisation settings,
the number of processes and the klalign version. Settings that cannot change it (where things are
written, logging, saving) are left out.

- A fresh run that finds collected data refuses to reuse it: it belongs to another run.
- A resumed run compares its settings with the manifest and refuses, naming each difference, when one
  would change what is collected; it adopts data without a manifest (written by an older klalign, or
  a store copied here on purpose with its manifest removed) and writes one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from klalign.errors import RunMismatchError
from klalign.ops.modules import base_model

MANIFEST = "manifest.json"

# TrainingArguments fields (and prefixes) that cannot change what is collected.
HARMLESS_FIELDS = {
    "output_dir", "logging_dir", "report_to", "run_name", "resume_from_checkpoint", "feedback_dir", "disable_tqdm",
    "overwrite_output_dir", "push_to_hub", "save_steps", "save_strategy", "save_total_limit", "save_every_rounds",
    "save_on_each_node", "save_only_model", "save_safetensors", "log_level", "log_level_replica", "log_on_each_node",
    "per_device_eval_batch_size", "eval_strategy", "eval_steps", "eval_delay", "project", "trackio_space_id",
    "debug", "include_num_input_tokens_seen", "restore_callback_states_from_checkpoint", "torch_empty_cache_steps",
    "accelerator_config", "deepspeed", "local_rank", "kl_warning_threshold", "ddp_backend", "ddp_timeout", "use_cpu", "skip_memory_metrics",
}
HARMLESS_PREFIXES = ("logging_", "hub_", "dataloader_", "eval_", "push_to_hub", "save_", "trackio_", "_")
CONSTANT_SCHEDULES = {"constant", "constant_with_warmup"}



def digest(value) -> str:
    """A short sha256 of any JSON-able value (prompts, tables, configs)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def args_settings(args) -> dict:
    """A config's fields that can change what is collected (see HARMLESS_FIELDS). `num_rounds` changes
    only the length of a run unless the learning-rate schedule depends on it."""
    fields = args.to_dict() if hasattr(args, "to_dict") else dataclasses.asdict(args)
    kept = {k: v for k, v in fields.items() if k not in HARMLESS_FIELDS and not k.startswith(HARMLESS_PREFIXES)}
    if fields.get("lr_scheduler_type") in CONSTANT_SCHEDULES or str(fields.get("lr_scheduler_type")).endswith(
            ("CONSTANT", "CONSTANT_WITH_WARMUP")):
        kept.pop("num_rounds", None)
    return json.loads(json.dumps(kept, default=str))


def model_fingerprint(model) -> str:
    """A content hash of a model's weights: of its checkpoint files when it was loaded from a local
    folder (`klalign.runs.integrity.model_digest`), else of its state dict (models built in memory)."""
    from klalign.runs.integrity import model_digest

    base = base_model(model)
    folder = Path(str(getattr(base.config, "_name_or_path", "") or ""))
    if folder.is_dir() and (any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file()):
        return "files:" + model_digest(folder)[:16]
    hasher = hashlib.sha256()
    for name, tensor in sorted(base.state_dict().items()):
        hasher.update(name.encode())
        hasher.update(tensor.detach().float().cpu().numpy().tobytes())
    return "weights:" + hasher.hexdigest()[:16]


SAMPLED_VOCAB = "token_ids_vocab"  # the column naming the tokenizer a dataset's token-id columns were written with


def tokenizer_fingerprint(tokenizer) -> str:
    """A content hash of a tokenizer's vocabulary (token -> id, added tokens included): token ids written with one
    tokenizer mean the same text under another only if this agrees."""
    vocab = sorted(tokenizer.get_vocab().items())
    return "vocab:" + hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """`key: recorded -> current` for every setting that differs (nested dicts flattened)."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_or_write(path: Path, settings: dict, has_data: bool, resuming: bool, what: str) -> None:
    """Enforce the module's rules for collected data whose manifest is `path` (`what` names the data in
    messages); write the manifest when none is there. Called on the main process."""
    path = Path(path)
    folder = path.parent
    recorded = json.loads(path.read_text()) if path.is_file() else None
    if has_data and not resuming:
        detail = "" if recorded is None else "; its settings differ from this run's in: " + (
            "; ".join(differences(recorded, settings)) or "nothing (identical settings)")
        raise RunMismatchError(
            f"{what} in {folder} already holds data collected by another run{detail}. To continue that run, resume "
            "it (--resume_from_checkpoint true); to start a new one, choose another output_dir.")
    if recorded is not None and resuming:
        changed = differences(recorded, settings)
        if changed:
            raise RunMismatchError(
                f"cannot reuse {what} in {folder}: it was collected with other settings, and reusing it would mix "
                f"two runs' data. Changed: " + "; ".join(changed) + f". Restore them, or start a new output_dir "
                f"(to reuse the data anyway, delete {path}).")
    if recorded is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
        tmp.replace(path)
