"""Offline reverse-KL DPO, RSO and IPO: a drop-in `trl.DPOTrainer` (ALGORITHMS.md section 2).

`klalign.DPOTrainer` takes the same constructor arguments as `trl.DPOTrainer` and keeps its data
preparation, reference handling (explicit model, disabled LoRA adapter, or precomputed
log-probs) and distributed plumbing. What it replaces is the part the papers define: sequence
log-probs (`klalign.ops.logprobs`), the loss (`klalign.ops.preference_losses`, one function per `loss_type`) and the
logged metrics. On the same model, reference, data and `beta`, its loss equals TRL's (tested).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import trl
from accelerate.utils import is_peft_model
from trl.models.utils import disable_gradient_checkpointing

from klalign.config.checks import check_training_config
from klalign.models.reference import Reference
from klalign.ops.batching import SHARE_PROMPT_HELP
from klalign.ops.logprobs import sequence_logprobs
from klalign.ops.modules import disable_dropout
from klalign.ops.preference_losses import (
    PREFERENCE_LOSSES,
    bradley_terry_probability,
    expected_label_loss,
    get_preference_loss,
)
from klalign.runs.manifest import SAMPLED_VOCAB, tokenizer_fingerprint

LABEL_PROB = "preference_prob"  # the column a pair's P(chosen > rejected) is carried in
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # a pair's tokens as they were sampled
logger = logging.getLogger(__name__)


@dataclass
class DPOConfig(trl.DPOConfig):
    """`trl.DPOConfig` restricted to the reverse-KL losses klalign implements.

    `loss_type` selects one of sigmoid (DPO; RSO's sigmoid-norm), hinge (RSO), sigmoid_norm
    (TRL's length-normalised DPO) or ipo. `bf16` defaults to what the machine supports.
    """

    loss_type: str = field(
        default="sigmoid",
        metadata={"help": f"Preference loss, one of {sorted(PREFERENCE_LOSSES)}."},
    )
    pair_labels: str = field(
        default="drawn",
        metadata={"help": "'drawn': each pair's chosen response is the preferred one (TRL's DPO). 'expected': the loss "
                          "averaged over each pair's Bradley-Terry label, P(chosen > rejected) from a preference_prob "
                          "column or sigmoid(chosen_reward - rejected_reward) from reward columns (RSO's pairs carry "
                          "them): DPO's optimum is then the tilt pi_ref exp(r / beta)."},
    )
    share_prompt: bool = field(default=True, metadata={"help": SHARE_PROMPT_HELP})
    bf16: bool | None = field(
        default=None, metadata={"help": "Train in bfloat16 mixed precision; default: on when a bf16 GPU is present."}
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        check_training_config(self)  # beta > 0, output_dir, report_to: before any model loads
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if len(loss_types) != 1:
            raise ValueError(f"loss_type takes one loss in klalign, got {loss_types}")
        get_preference_loss(loss_types[0])
        if self.pair_labels not in ("drawn", "expected"):
            raise ValueError(f"pair_labels must be 'drawn' or 'expected', got {self.pair_labels!r}")
        if self.f_divergence_type != "reverse_kl":
            raise ValueError(f"klalign's DPOTrainer is reverse-KL only; got f_divergence_type={self.f_divergence_type!r}")
        unsupported = {
            "ld_alpha": None, "use_weighting": False, "loss_weights": None, "sync_ref_model": False, "label_smoothing": 0.0
        }
        for name, default in unsupported.items():
            if getattr(self, name) != default:
                raise ValueError(f"{name}={getattr(self, name)!r} is a trl.DPOTrainer option klalign does not support")
        super().__post_init__()
        self.loss_type = loss_types[0]


class DPOTrainer(trl.DPOTrainer):
    """DPO / RSO / IPO trainer with `trl.DPOTrainer`'s constructor (model, ref_model, args, ...).

    Batches hold the chosen rows then the rejected rows, `(2B, T)`, as TRL's collator builds them.
    """

    _tag_names = ["trl", "dpo", "klalign"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *pargs, **kwargs):
        if args is None:
            args = DPOConfig(output_dir="klalign-dpo")
        elif not isinstance(args, DPOConfig):
            raise TypeError(f"args must be a klalign.DPOConfig, got {type(args).__name__}")
        self.preference_loss = get_preference_loss(args.loss_type)
        if args.pair_labels == "expected":  # checked before any tokenisation or reference pass
            for name in ("train_dataset", "eval_dataset"):
                if kwargs.get(name) is not None:
                    kwargs[name] = with_label_probabilities(kwargs[name], name)
        super().__init__(model, ref_model, args, *pargs, **kwargs)
        if args.pair_labels == "expected":
            self.data_collator = _KeepLabelProbabilities(self.data_collator)
        if args.disable_dropout:  # TRL's own pass misses the float attention-dropout rates (klalign.ops.modules)
            for module in (self.model, self.ref_model):
                if module is not None:
                    disable_dropout(module)

    @property
    def reference(self) -> Reference:
        """pi_ref (`klalign.models.reference`): `ref_model`, or with LoRA the policy with its adapter disabled (TRL's
        "ref" adapter when the model carries one). Without either, the policy itself: only TRL's
        precomputation calls it so, before any step, when the policy still is the reference."""
        adapter = None
        if self.ref_model is None and is_peft_model(self.model):
            adapter = "ref" if "ref" in self.accelerator.unwrap_model(self.model).peft_config else None
        return Reference(self.ref_model, self.accelerator, adapter_name=adapter)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # private: klalign.internals
        """Pairs that carry their sampled tokens (`TOKEN_COLUMNS`, as klalign's RSO data step writes
        them) are trained on those tokens, not on their text re-rendered by the chat template: the template closes
        every assistant turn (SmolLM2: `<|im_end|>` and a newline), so a reply cut at max_new_tokens would get an
        end-of-turn token it never sampled, in a context the policy never ends in, and its DPO log-ratio a term
        that moves no sampled probability (measured on SmolLM2 pairs of 32-token replies: 10% of the learned
        margin). Ids written with another tokenizer (`SAMPLED_VOCAB` differs) fall back to the text."""
        columns = getattr(dataset, "column_names", None) or []
        if all(c in columns for c in TOKEN_COLUMNS):
            written = set(dataset[SAMPLED_VOCAB]) if SAMPLED_VOCAB in columns else None
            tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor's, or itself
            if written is None or written == {tokenizer_fingerprint(tokenizer)}:
                if args.max_length is not None and args.truncation_mode == "keep_start":  # as TRL's own step
                    dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
                return dataset
            logger.warning(f"{dataset_name}: its token ids were written with another tokenizer ({sorted(written)}); "
                           "training on its text, tokenized with this one")
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):  # private: klalign.internals (TRL lists the columns it keeps)
        super()._set_signature_columns_if_needed()
        if self.args.pair_labels == "expected" and LABEL_PROB not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, LABEL_PROB]

    @staticmethod
    def _split_inputs(inputs):
        return inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]

    def compute_ref_log_probs(self, model, inputs):
        """Reference `s(y)` for one batch: ((B,), (B,)) for chosen and rejected. (`model` is TRL's
        argument; the reference is always `self.reference`.)"""
        batch = dict(zip(("input_ids", "attention_mask", "completion_mask"), self._split_inputs(inputs)))
        with (
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self.accelerator.autocast(),
        ):
            ref_logps = self.reference.sequence_logprobs(self.model, batch, pairs=self.args.share_prompt)
        return ref_logps.chunk(2, dim=0)

    def _reference_logprobs(self, inputs):
        if self.precompute_ref_logps:  # private: klalign.internals
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return self.compute_ref_log_probs(self.ref_model or self.model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):  # private: klalign.internals
        mode = "train" if self.model.training else "eval"
        logps = sequence_logprobs(model, *self._split_inputs(inputs), pairs=self.args.share_prompt)  # (2B,)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # (B,) each
        ref_chosen_logps, ref_rejected_logps = self._reference_logprobs(inputs)
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        # TRL's collator marks the completion from its first token; the shifted mask counts them.
        lengths = inputs["completion_mask"][:, 1:].sum(dim=1).to(logps.dtype)
        chosen_lengths, rejected_lengths = lengths.chunk(2, dim=0)
        if self.args.pair_labels == "expected":
            per_pair = expected_label_loss(self.preference_loss, chosen_logratios, rejected_logratios, chosen_lengths,
                                           rejected_lengths, self.beta, inputs[LABEL_PROB].to(logps))  # (B,)
        else:
            per_pair = self.preference_loss(
                chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, self.beta
            )
        loss = per_pair.mean()
        self._log_pair_metrics(mode, chosen_logratios, rejected_logratios, chosen_logps, rejected_logps)
        if mode == "train":  # tokens trained on so far (prompt + completion, all processes), as TRL logs it
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            return loss, outputs
        return loss

    def _log_pair_metrics(self, mode, chosen_logratios, rejected_logratios, chosen_logps, rejected_logps):
        """Implicit rewards beta * log-ratio, their margin and preference accuracy (DPO paper, section 5)."""
        gather = self.accelerator.gather_for_metrics
        chosen_rewards = gather(self.beta * chosen_logratios.detach())
        rejected_rewards = gather(self.beta * rejected_logratios.detach())
        metrics = self._metrics[mode]  # private: klalign.internals
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())


def with_label_probabilities(dataset, name: str = "train_dataset"):
    """The dataset with a `preference_prob` column: kept if present, else sigmoid(chosen_reward - rejected_reward).
    A dataset with neither is refused, naming the columns it has."""
    columns = dataset.column_names or []  # an IterableDataset may not know its columns
    if LABEL_PROB in columns:
        return dataset
    if not {"chosen_reward", "rejected_reward"} <= set(columns):
        raise ValueError(f"pair_labels 'expected' needs a {LABEL_PROB!r} column or 'chosen_reward' and 'rejected_reward' "
                         f"columns in {name}; it has {columns}. Set pair_labels: drawn for a dataset of labels only.")
    def add(batch):
        probs = bradley_terry_probability(torch.tensor(batch["chosen_reward"], dtype=torch.float64),
                                          torch.tensor(batch["rejected_reward"], dtype=torch.float64))
        return {LABEL_PROB: probs.tolist()}
    return dataset.map(add, batched=True)


class _KeepLabelProbabilities:
    """TRL's preference collator, plus each pair's P(chosen > rejected) as a (B,) tensor (TRL's drops extra keys)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        batch[LABEL_PROB] = torch.tensor([example[LABEL_PROB] for example in examples], dtype=torch.float32)
        return batch
