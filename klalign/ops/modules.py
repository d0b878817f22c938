"""What a model passed around the library is made of: the module under DDP / DeepSpeed / FSDP wrappers, and
the transformers model under a PEFT wrapper (whose config, generation config and output head are its own)."""

from __future__ import annotations


def unwrap(model):
    """The module under DDP / DeepSpeed / FSDP wrappers: accelerate's `extract_model_from_parallel`, which
    `Accelerator.unwrap_model` calls, usable where no accelerator is at hand. A PEFT model stays one."""
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
