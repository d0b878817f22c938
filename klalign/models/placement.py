"""Where models live under each launch mode, and equal work on every process.

Single process, DDP, DeepSpeed ZeRO-2 and ZeRO-3 (with `zero3_init_flag` true or false) each place
models differently; this module is the one place that knows how.

- The policy is loaded the way the launch mode loads models (under ZeRO-3 with `zero3_init_flag`,
  transformers partitions it while loading) and wrapped by the Trainer.
- Frozen models the trainers call (the reference, reward models, LM judges, feature models) are
  prepared for inference with `prepare_frozen`, as TRL prepares its reference and reward models:
  under DeepSpeed an inference engine (ZeRO-3 shards it, so every process must call it equally
  often), otherwise the accelerator's device.
- Models built or converted on one process (the tiny models, a GGUF conversion) and models that
  generate outside a trainer (RSO's sampler, `BestOfNSampler`, `klalign evaluate`) are loaded whole
  with `whole_model_loading`: partitioning them would make their forward passes collectives that
  the other processes never join (a hang), and generating from a partitioned model gathers every
  layer at every decoding step.
- `check_equal_work` refuses, before any model loads, a configuration that would give processes
  different numbers of prompts: under DDP and ZeRO-3 every forward and backward is a collective.
"""

from __future__ import annotations

import contextlib
import weakref

import torch


@contextlib.contextmanager
def whole_model_loading():
    """Load or build models whole in this block, even when DeepSpeed ZeRO-3 partitions models at load.

    transformers partitions a model while loading whenever a ZeRO-3 DeepSpeed config is registered
    (TrainingArguments registers it under `accelerate launch` with a ZeRO-3 config, whatever
    `zero3_init_flag` says). The registration is a module-level weak reference with public
    `set_hf_deepspeed_config` / `unset_hf_deepspeed_config` functions but no public getter, so the
    current object is read from that private global to be put back afterwards.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # private: klalign.internals (no public getter)
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def process_state():
    """accelerate's PartialState for a script that trains nothing (`klalign evaluate`, a best-of-N job): on
    CPUs with the gloo backend, which is what runs there (DeepSpeed's CPU default, oneCCL, is not installed)."""
    import os

    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(**({"backend": "gloo"} if launched and not torch.cuda.is_available() else {}))


def decided_on_main(fn):
    """`fn()` on the main process (a check, a file read, a choice), its result on every process; an
    error it raises is raised on every process, so none waits forever at the next collective."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    outcome = [None]
    if state.is_main_process:
        try:
            outcome[0] = ("value", fn())
        except Exception as error:  # re-raised below, on every process
            outcome[0] = ("error", error)
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def deepspeed_plugin(accelerator):
    return getattr(accelerator.state, "deepspeed_plugin", None) if accelerator is not None else None


def is_zero3(accelerator) -> bool:
    plugin = deepspeed_plugin(accelerator)
    return plugin is not None and plugin.zero_stage == 3


_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its prepared form


def prepare_frozen(model, accelerator):
    """A frozen model ready for inference under the accelerator's launch mode (see the module docstring).

    A model shared by two roles (a reward model that is also the feature model, a reference that
    also gives features) is prepared once: the second call returns the first one's result.
    """
    if model in _PREPARED:
        return _PREPARED[model]
    model.eval().requires_grad_(False)
    if deepspeed_plugin(accelerator) is not None:
        import deepspeed

        prepared, *_ = deepspeed.initialize(model=model, config=inference_config(accelerator, model))
        prepared.eval()
    else:
        prepared = accelerator.prepare_model(model, evaluation_mode=True)
    _PREPARED[model] = prepared
    return prepared


def inference_config(accelerator, model) -> dict:
    """The launch's DeepSpeed config for a frozen model, as TRL's `prepare_deepspeed` builds it: no
    optimizer or scheduler; ZeRO-3 kept (the model is sharded), stages 0-2 become 0 (a whole copy per
    process). Unlike TRL's, the hidden-size "auto" entries are filled in the nested dict (DeepSpeed
    ignores TRL's dotted keys), since the policy's engine, which fills them, may not exist yet."""
    import copy

    config = copy.deepcopy(deepspeed_plugin(accelerator).deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0
    else:
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = max(getattr(text, "hidden_sizes", None) or [text.hidden_size])
        sized = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                 "stage3_param_persistence_threshold": 10 * hidden}
        zero.update({key: value for key, value in sized.items() if zero.get(key, "auto") == "auto"})
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if config.get(key) == "auto":
            config[key] = 1
    if config.get("train_batch_size") == "auto":
        del config["train_batch_size"]
    for dtype in ("bf16", "fp16"):
        if config.get(dtype, {}).get("enabled") == "auto":
            config[dtype]["enabled"] = accelerator.mixed_precision == dtype
    return config


def place_frozen(model, accelerator=None, device=None):
    """`prepare_frozen` on a trainer's accelerator, or the whole model moved to `device` (default: this
    process's device) for work outside a trainer."""
    if accelerator is not None:
        return prepare_frozen(model, accelerator)
    from accelerate import PartialState

    return model.eval().requires_grad_(False).to(device or PartialState().device)


def gathered(params, modify: bool = False):
    """Full values of ZeRO-3-partitioned parameters inside the block (`modify`: written back from rank 0's
    values on exit); a no-op for parameters that are not partitioned."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def gathered_for_generation(model, accelerator):
    """Unwrap DDP/DeepSpeed; under ZeRO-3 gather the sharded parameters while generating (TRL's
    `unwrap_model_for_generation`: once for the block, not layer by layer at every decoding step)."""
    if accelerator is None:
        return contextlib.nullcontext(model)
    from trl.models import unwrap_model_for_generation

    return unwrap_model_for_generation(model, accelerator)


def model_device(model) -> torch.device:
    """The device a (possibly wrapped or partitioned) model computes on."""
    return next(model.parameters()).device


def check_equal_work(world_size: int, **counts: int) -> None:
    """Raise unless every count is a multiple of the number of processes (names the fields)."""
    bad = {name: n for name, n in counts.items() if n % world_size}
    if bad:
        fields = ", ".join(f"{name} ({n})" for name, n in bad.items())
        raise ValueError(
            f"{fields} must be a multiple of the number of processes ({world_size}): every process must get "
            "the same number of prompts, since DDP and ZeRO-3 run each forward and backward pass in lockstep "
            "(a process with less work would hang the others or crash)"
        )
