"""What a model passed around the library is made of: the module under DDP / DeepSpeed / FSDP wrappers, and
the transformers model under a PEFT wrapper (whose config, generation config and output head are its own)."""

from __future__ import annotations

import contextlib


def unwrap(model):
    """The module under DDP / DeepSpeed / FSDP wrappers: accelerate's `extract_model_from_parallel`, which
    `Accelerator.unwrap_model` calls, usable where no accelerator is at hand. A PEFT model stays one."""
    if not hasattr(model, "module"):  # not wrapped (and no DeepSpeed import for the common case)
        return model
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def base_model(model):
    """The transformers model under DDP / DeepSpeed and PEFT wrappers."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_config(model):
    """The config of the model's language part (multimodal configs nest it)."""
    config = unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@contextlib.contextmanager
def evaluation_mode(model):
    """The block runs with `model` in eval mode (dropout off), then its mode is put back: log-probs that must
    be exact (a reference, pi_old, an anchor, a KL estimate) are the network's own, not a random subnetwork's."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


DROPOUT_RATES = ("attention_dropout", "attn_dropout", "dropout_p")  # float rates read in forward, not modules


def disable_dropout(model) -> None:
    """Every dropout of `model` off, in place: each `nn.Dropout` (p = 0; LoRA's `lora_dropout` is one) as
    TRL's `disable_dropout_in_model` does, and the float rates many attention layers read in their forward
    instead of holding a module (Llama's, Qwen's and Mistral's `attention_dropout`), which TRL's misses."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in DROPOUT_RATES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(unwrap(model), "config", None)
    if config is not None and isinstance(getattr(config, "attention_dropout", None), float):
        config.attention_dropout = 0.0
