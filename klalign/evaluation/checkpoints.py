"""The models `klalign evaluate` compares, found and checked before anything is sampled: run folders expanded
into their checkpoints (offline steps, online rounds) and final model, each holding weights, and each
tokenizing exactly like the reference (log-ratios are taken on the reference tokenizer's ids)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from klalign.errors import EvaluationError
from klalign.models.loading import load_tokenizer
from klalign.runs.integrity import model_digest, weight_files

CHECKPOINT_DIR = re.compile(r"^checkpoint-(?:round-)?(\d+)$")  # offline steps; online trainers' rounds

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")




@dataclass
class Checkpoint:
    """One model to evaluate: a full model folder, or a PEFT adapter folder loaded on the reference."""

    name: str
    path: Path
    step: int | None
    is_adapter: bool



def as_checkpoint(folder: Path, name: str, step: int | None) -> Checkpoint:
    """A checkpoint for a model folder, or an EvaluationError saying what the folder lacks."""
    is_adapter = (folder / "adapter_config.json").is_file()
    if not is_adapter and not (folder / "config.json").is_file():
        raise EvaluationError(
            f"checkpoint {str(folder)!r} is not a model folder (no config.json or adapter_config.json) "
            "nor a run folder (no checkpoint-* subfolders)"
        )
    if not weight_files(folder):
        raise EvaluationError(f"checkpoint {str(folder)!r} holds no weight files (model*.safetensors / *.bin)")
    return Checkpoint(name, folder, step, is_adapter)



def final_step(run: Path) -> int | None:
    state = run / "trainer_state.json"
    return json.loads(state.read_text()).get("global_step") if state.is_file() else None



def find_checkpoints(paths: list[str], include_final_model: bool = True, digest=model_digest) -> list[Checkpoint]:
    """Expand run folders into their checkpoint-* (by step) and, optionally, their final model (unless the last
    checkpoint holds the same weights at the same step: the Trainer saves one at the last step).

    Names are the folder names ("checkpoint-32", "final"), or the full paths where those collide. `digest`: a
    folder's `model_digest` (the caller's memo, so that a folder's weights are hashed once).
    """
    if not paths:
        raise EvaluationError("no checkpoints to evaluate: set `checkpoints` (model, adapter or run folders)")
    found = []
    for given in paths:
        folder = Path(given)
        if not folder.is_dir():
            raise EvaluationError(f"checkpoint {given!r} does not exist or is not a folder")
        steps = sorted((int(m[1]), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_DIR.match(p.name)))
        if not steps:
            found.append(as_checkpoint(folder, folder.name, None))
            continue
        found += [as_checkpoint(p, p.name, step) for step, p in steps]
        if include_final_model and ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()):
            final = as_checkpoint(folder, "final", final_step(folder))
            last_step, last = steps[-1]
            if last_step != final.step or digest(last) != digest(folder):
                found.append(final)  # else: the last checkpoint is the final model (saved at the last step)
    found = list({c.path.resolve(): c for c in found}.values())  # a folder given twice is evaluated once
    names = [c.name for c in found]
    if len(set(names)) < len(names):
        for c in found:
            c.name = str(c.path) if c.name != "final" else f"{c.path} (final)"
    return found



def check_tokenizer(checkpoint: Checkpoint, reference_tokenizer, reference_vocab_size: int) -> None:
    """Raise unless the checkpoint tokenizes like the reference: same vocabulary and special tokens.

    Log-ratios are taken on token ids that the reference's tokenizer produced, so any difference
    would silently compare different strings. A folder without tokenizer files is checked through
    its config's vocab_size only.
    """
    folder = checkpoint.path
    where = f"checkpoint {str(folder)!r}"
    if not checkpoint.is_adapter:
        vocab_size = AutoConfig.from_pretrained(folder).vocab_size
        if vocab_size != reference_vocab_size:
            raise EvaluationError(
                f"{where}: vocab_size {vocab_size} differs from the reference's {reference_vocab_size}"
            )
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return
    tokenizer = load_tokenizer(str(folder))
    vocab, ref_vocab = tokenizer.get_vocab(), reference_tokenizer.get_vocab()
    if vocab != ref_vocab:
        differ = sorted(set(vocab.items()) ^ set(ref_vocab.items()), key=str)
        raise EvaluationError(
            f"{where}: its tokenizer does not match the reference's ({len(vocab)} vs {len(ref_vocab)} tokens; "
            f"{len(differ)} (token, id) entries differ, e.g. {differ[:3]})"
        )
    for name in SPECIAL_TOKENS:
        ours, theirs = getattr(tokenizer, name), getattr(reference_tokenizer, name)
        if ours != theirs:
            raise EvaluationError(f"{where}: {name} is {ours!r} but the reference's is {theirs!r}")
