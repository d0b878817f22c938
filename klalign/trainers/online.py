"""The online loop shared by klalign's online trainers (DESIGN.md "The online loop").

    prompts -> generate (policy, enhancer or opponent) -> oracle -> feedback store (disk)
            -> batch -> loss -> optimizer step -> next round

`OnlineTrainer` is a `transformers.Trainer` whose `train()` runs rounds. A subclass says only
what it samples and asks the oracle (`collect`) and how it learns from the rows (`update`);
everything else is here, once: prompt scheduling, chunked collection stored as it comes, seeding,
the reference (`klalign.models.reference.Reference`: a separate frozen model, or the policy with its LoRA
adapter disabled), the oracle's models prepared for the launch mode, optimizer steps through the Trainer's accelerator (single device, DDP, DeepSpeed), logging, and
atomic per-round checkpoints.

Exact resume. Every random draw is seeded from (seed, round, phase, chunk), never from the
history of the run. A round's collection is split into chunks that are written to the store as
they finish; a resumed run reuses stored chunks (never re-querying the oracle) and regenerates
only the missing ones with the same seeds. A round's checkpoint (model, optimizer, scheduler,
trainer state) is written to a temporary folder and renamed, so a killed run resumes from the
last whole round, re-runs the interrupted update from the same rows and seeds, and ends with the
same model as an uninterrupted run. With `save_every_rounds` > 1 the rounds after the last
checkpoint are replayed from the store: their updates are recomputed, their feedback is not.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object, is_peft_model
from tqdm.auto import tqdm
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import TrainOutput
from transformers.utils import logging as hf_logging

import klalign
from klalign.config.checks import check_training_config
from klalign.data.datasets import validate_prompt_dataset
from klalign.generation.sample import sample_completions
from klalign.generation.types import GenerationArguments
from klalign.models.placement import check_equal_work, decided_on_main, prepare_frozen
from klalign.models.reference import Reference
from klalign.ops.batching import completion_batch
from klalign.ops.logprobs import sequence_logprobs, token_logprobs
from klalign.runs.feedback import FeedbackStore
from klalign.runs.integrity import write_checksums
from klalign.runs.manifest import (
    MANIFEST,
    args_settings,
    check_or_write,
    digest,
    model_fingerprint,
)
from klalign.runs.resume import ResumePlan, describe, plan_resume, round_checkpoints
from klalign.runs.seeding import derived_seed, seed_everything

ROUND_SUMMARY = ("loss", "kl_k3", "main_reward", "oracle_reward", "win_rate/vs_reference", "oracle_queries")


@dataclass
class OnlineConfig(TrainingArguments, GenerationArguments):
    """Rounds, sampling and KL settings shared by the online trainers (plus all TrainingArguments and the
    sampling settings of GenerationArguments)."""

    beta: float = field(default=0.1, metadata={"help": "KL coefficient beta of J = E r - beta KL(pi || pi_ref)."})
    num_rounds: int = field(default=4, metadata={"help": "Rounds of (collect feedback, update the policy)."})
    prompts_per_round: int = field(default=32, metadata={"help": "Prompts drawn per round (all processes)."})
    prompts_per_chunk: int = field(
        default=8, metadata={"help": "Prompts per stored collection chunk: the unit of work a killed run can lose."}
    )
    importance_correction: str = field(
        default="none",
        metadata={"help": "'truncated': weight each sample's policy-gradient and KL-estimate terms by "
                          "min(pi_train(y) / pi_sampler(y), importance_cap), for samples not drawn from the training "
                          "model itself (vLLM's kernels and dtype, another temperature): truncated importance "
                          "sampling, as TRL and OpenRLHF correct vLLM samples. 'none': no weights."},
    )
    importance_cap: float = field(default=2.0, metadata={"help": "Truncation of the importance weights (> 1)."})
    save_every_rounds: int = field(
        default=1,
        metadata={"help": "Checkpoint every this many rounds (and after the last). A resumed run replays "
                          "later rounds from the stored feedback, so a larger value never re-queries the oracle."},
    )
    feedback_dir: str | None = field(
        default=None, metadata={"help": "Where collected feedback is stored; default: <output_dir>/feedback."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from checkpoint folders to run (off by default)."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bfloat16 mixed precision; default: on when a bf16 GPU is present."}
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        check_training_config(self)
        for name in ("num_rounds", "prompts_per_round", "prompts_per_chunk", "save_every_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.generation_args()  # validates temperature, top_p, max_new_tokens, the backend
        if self.importance_correction not in ("none", "truncated") or self.importance_cap <= 1:
            raise ValueError(f"importance_correction must be 'none' or 'truncated' and importance_cap > 1, got "
                             f"{self.importance_correction!r}, {self.importance_cap}")
        if self.on_policy and self.importance_correction == "none" and (self.temperature != 1.0 or self.top_p != 1.0):
            raise ValueError(f"{type(self).__name__}: the policy gradient and the KL estimates need samples from pi "
                             f"itself: set temperature 1 and top_p 1 (got {self.temperature}, {self.top_p}), or "
                             "importance_correction: truncated")
        super().__post_init__()
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}: the online trainers take one "
                "optimizer step per batch and do not accumulate; set gradient_accumulation_steps: 1 (also in the "
                "DeepSpeed config) and size the batch with per_device_train_batch_size")
        check_equal_work(self.world_size, **self.equal_work_counts())

    on_policy = False  # True: the trainer's estimates need samples of pi itself (temperature 1, top_p 1)

    def equal_work_counts(self) -> dict[str, int]:
        """Counts of prompts each chunk of work is split by across processes (see `check_equal_work`):
        with both a multiple of the number of processes, so is every chunk, the last one included."""
        return {"prompts_per_round": self.prompts_per_round, "prompts_per_chunk": self.prompts_per_chunk}

    def generation_args(self, temperature: float | None = None) -> GenerationArguments:
        """The sampling settings as `klalign.generation` takes them (every field of GenerationArguments)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationArguments)}
        return GenerationArguments(**{**values, **({} if temperature is None else {"temperature": temperature})})


class OnlineTrainer(Trainer):
    """Base of the online trainers. Subclasses implement `collect` and `update`.

    Arguments follow `trl`'s trainers: `model`, `ref_model` (None: a frozen copy is not kept with
    LoRA, the adapter is disabled instead), `args`, `train_dataset` (a prompt dataset with a
    "prompt" column), `processing_class` (the tokenizer), `oracle`, `peft_config`.
    """

    oracle_kind: tuple[type, ...] = ()  # the oracle classes a subclass accepts

    def __init__(self, model, ref_model=None, args: OnlineConfig | None = None, train_dataset=None,
                 processing_class=None, oracle=None, peft_config=None, callbacks=None):
        if args is None or not isinstance(args, OnlineConfig):
            raise TypeError(f"args must be an OnlineConfig subclass instance, got {type(args).__name__}")
        if train_dataset is None:
            raise ValueError("train_dataset (a prompt dataset with a 'prompt' column) is required")
        train_dataset = validate_prompt_dataset(train_dataset, "train_dataset")
        if self.oracle_kind and not isinstance(oracle, self.oracle_kind):
            kinds = " or ".join(k.__name__ for k in self.oracle_kind)
            raise TypeError(f"{type(self).__name__} needs a {kinds} as oracle, got {type(oracle).__name__}")
        if peft_config is not None:
            from peft import get_peft_model

            seed_everything(derived_seed(args.seed, "adapter init"))  # the same adapter in every process and run
            model = get_peft_model(model, peft_config)
        if ref_model is None and not is_peft_model(model):
            raise ValueError("ref_model is required unless the policy is a PEFT model (its disabled adapter is the reference)")
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         callbacks=callbacks)
        self.remove_callback(ProgressCallback)  # counts optimizer steps, which the loop does not report: rounds instead
        self.prompts = list(train_dataset["prompt"])
        # What determines the collected data (klalign.runs.manifest), fingerprinted before anything is wrapped.
        self.settings = decided_on_main(lambda: self.collection_settings(model, ref_model, oracle, peft_config))
        self.ref_model = None if ref_model is None else prepare_frozen(ref_model, self.accelerator)
        self.reference = Reference(self.ref_model, self.accelerator)
        self.oracle = oracle.prepare(self.accelerator) if oracle is not None else None
        self.store = FeedbackStore(args.feedback_dir or Path(args.output_dir) / "feedback")
        self._engine, self._weights_version = None, 0  # the vLLM engine (generation_backend: vllm)

    def collection_settings(self, model, ref_model, oracle, peft_config) -> dict:
        """The run manifest's settings (klalign.runs.manifest): models, oracle, prompts, every config field
        that can change what is collected, the number of processes, the klalign version."""
        return {
            "klalign_version": klalign.__version__,
            "trainer": type(self).__name__,
            "processes": self.args.world_size,
            "policy": model_fingerprint(model),
            "peft": None if peft_config is None else json.loads(json.dumps(peft_config.to_dict(), default=str)),
            "reference": "policy with its adapter disabled" if ref_model is None else model_fingerprint(ref_model),
            "oracle": oracle.fingerprint() if oracle is not None else None,
            "prompts": {"count": len(self.prompts), "sha256": digest(self.prompts)},
            "config": args_settings(self.args),
        }

    # ---- what a subclass provides ----------------------------------------------------------------

    def collect(self, round_index: int, prompts: list) -> list[dict]:
        """Sample, query the oracle, and return the rows to store for these prompts."""
        raise NotImplementedError

    def update(self, round_index: int, rows: list[dict]) -> dict[str, float]:
        """Take optimizer steps on this round's rows (and older ones from `self.store`); return metrics."""
        raise NotImplementedError

    def steps_per_round(self) -> int:
        """Optimizer steps per round, for the learning-rate schedule (an upper bound is fine)."""
        return 1

    # ---- the loop --------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        resuming = resume_from_checkpoint not in (None, False) and str(resume_from_checkpoint).lower() != "false"
        plan = decided_on_main(lambda: self._plan(resume_from_checkpoint, resuming))  # before anything is sampled
        checkpoint = plan.checkpoint
        if checkpoint is not None and not self.is_deepspeed_enabled:
            self._load_from_checkpoint(checkpoint)  # private: klalign.internals
        max_steps = self.args.num_rounds * self.steps_per_round()
        self.state = TrainerState(max_steps=max_steps, logging_steps=1, save_steps=1)
        self.model_wrapped, _ = self._prepare_for_training(max_steps, None, checkpoint)  # private: klalign.internals
        if checkpoint is not None:
            self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        self.progress = tqdm(total=self.args.num_rounds, initial=plan.start_round, unit="round", dynamic_ncols=True,
                             disable=self.args.disable_tqdm or not self.is_world_process_zero())
        metrics: dict[str, float] = {}
        for round_index in range(plan.start_round, self.args.num_rounds):
            rows = self._collect_round(round_index)
            if self._engine is not None:
                self._engine.sleep()  # CUDA: free vLLM's memory for the update (woken by the next push)
            self.model_wrapped.train()
            self._phase(round_index, "updating")
            seed_everything(derived_seed(self.args.seed, round_index, "update"))
            metrics = {"round": round_index, **self.update(round_index, rows)}
            self.state.epoch = round_index + 1
            self.log_round(round_index, metrics)
            last = round_index == self.args.num_rounds - 1
            if last or (round_index + 1) % self.args.save_every_rounds == 0:
                self._phase(round_index, "saving")
                self._save_round_checkpoint(round_index)
            self.progress.update(1)
        self.progress.close()
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        return TrainOutput(self.state.global_step, metrics.get("loss", 0.0), metrics)

    def _plan(self, requested, resuming: bool) -> ResumePlan:
        """On the main process: the manifest rules for the store, then where to resume (klalign.runs.resume)."""
        check_or_write(self.store.directory / MANIFEST, self.settings, self.store.has_data(), resuming,
                       "the feedback store")
        if not resuming:
            return ResumePlan(None)
        plan = plan_resume(self.args.output_dir, requested, self.store, self.oracle.reproducible)
        print(describe(plan, self.store, self.args.num_rounds), flush=True)
        return plan

    def _phase(self, round_index: int, phase: str) -> None:
        self.progress.set_description_str(f"round {round_index}: {phase}", refresh=True)

    def log_round(self, round_index: int, metrics: dict[str, float]) -> None:
        """Record a round's metrics; integrations (TensorBoard, trackio, ...) plot them against the round,
        and one line goes to the console."""
        self.state.log_history.append({**metrics, "step": self.state.global_step})
        view = copy.copy(self.state)
        view.global_step = round_index  # the x-axis of every integration's plot
        self.control = self.callback_handler.on_log(self.args, view, self.control, dict(metrics))
        shown = " · ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ROUND_SUMMARY and isinstance(v, (int, float)))
        if self.is_world_process_zero():
            tqdm.write(f"round {round_index}: {shown}")

    def round_prompts(self, round_index: int) -> list:
        """The prompts of a round: a seeded draw without replacement (with, if there are too few)."""
        rng = np.random.default_rng(derived_seed(self.args.seed, round_index, "prompts"))
        n = self.args.prompts_per_round
        idx = rng.choice(len(self.prompts), size=n, replace=n > len(self.prompts))
        return [self.prompts[i] for i in idx]

    def _collect_round(self, round_index: int) -> list[dict]:
        """Collect a round chunk by chunk; stored chunks are reused, new ones stored as they finish."""
        prompts = self.round_prompts(round_index)
        size = self.args.prompts_per_chunk
        starts = range(0, len(prompts), size)
        rows: list[dict] = []
        for chunk_index, start in enumerate(starts):
            self._phase(round_index, f"collecting chunk {chunk_index + 1}/{len(starts)}")
            rows += self._collect_chunk(round_index, chunk_index, prompts[start : start + size])
        if self.args.should_save:
            self.store.mark_complete(round_index)
        return rows

    def _collect_chunk(self, round_index: int, chunk_index: int, prompts: list) -> list[dict]:
        """Each process collects its share of the chunk; the main process stores the whole chunk."""
        rank, world = self.args.process_index, self.args.world_size
        return self.collected(round_index, chunk_index, lambda: self.collect(round_index, prompts[rank::world]))

    def collected(self, round_index: int, chunk_index: int, collect_fn) -> list[dict]:
        """The rows of chunk `chunk_index` of a round: from the store if they were collected before,
        else from `collect_fn()` (run seeded by round and chunk on every process, gathered, stored).

        Trainers whose samples depend on parameters that change within a round (Nash-MP's inner
        steps) call this inside `update` with chunk indices of their own.
        """
        stored = self.store.chunk(round_index, chunk_index)
        if stored is not None:
            return stored
        rank, world = self.args.process_index, self.args.world_size
        seed_everything(derived_seed(self.args.seed, round_index, "collect", chunk_index, rank))
        rows = collect_fn()
        for row in rows:
            row.setdefault("round", round_index)
        if world > 1:
            rows = gather_object(rows)
        if self.args.should_save and rows:
            self.store.write_chunk(round_index, chunk_index, rows)
        self.accelerator.wait_for_everyone()
        return rows

    # ---- helpers for subclasses ------------------------------------------------------------------

    def generate(self, prompts: list, num_samples: int, temperature: float | None = None, weights=None):
        """Sampled completions (token ids kept) from the policy, with the weights now in the model.

        With `generation_backend: vllm` the weights are pushed into this process's engine when they
        changed: `weights` names weights swapped in for the call (another iterate: their own name);
        by default they are the trainer's current ones (`weights_changed` marks every change)."""
        args = self.args.generation_args(temperature)
        engine = self.vllm_engine() if args.generation_backend == "vllm" else None
        return sample_completions(self.model_wrapped, self.processing_class, prompts, num_samples, args,
                                  accelerator=self.accelerator, progress=False, engine=engine,
                                  weights_key=("current", self._weights_version) if weights is None else weights,
                                  sampler_logprobs=self._sampler_differs(args))

    def _sampler_differs(self, args: GenerationArguments) -> bool:
        """Whether HF sampling should report its log-probs: when its law is not the training policy's, or
        a correction needs them (vLLM always reports them)."""
        return self.args.importance_correction != "none" or args.temperature != 1.0 or args.top_p != 1.0

    def weights_changed(self) -> None:
        """The trainable weights changed outside an optimizer step (a reset): vLLM gets them pushed again."""
        self._weights_version += 1

    def vllm_engine(self):
        """This process's colocated vLLM engine, built on first use (the same point on every process)."""
        if self._engine is None:
            from klalign.generation.vllm_engine import engine_for

            self._engine = engine_for(self.accelerator.unwrap_model(self.model_wrapped), self.processing_class,
                                      self.args.generation_args(), seed=derived_seed(self.args.seed, "vllm"))
        return self._engine

    def generate_reference(self, prompts: list, num_samples: int):
        """Sampled completions of pi_ref (token ids kept)."""
        with self.reference.generation_model(self.model_wrapped) as model:
            return sample_completions(model, self.processing_class, prompts, num_samples, self.args.generation_args(),
                                      progress=False)

    def batch(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        return completion_batch(prompt_ids, completion_ids, self.processing_class.pad_token_id, self.args.device)

    def policy_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`s(y)` under the policy, with gradients. (B,)"""
        return sequence_logprobs(self.model_wrapped, **batch)

    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`s_ref(y)` (`klalign.models.reference.Reference`). (B,)"""
        return self.reference.sequence_logprobs(self.model_wrapped, batch)

    @torch.no_grad()
    def frozen_policy_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`s(y)` under the current policy without gradients. (B,)"""
        return sequence_logprobs(self.model_wrapped, **batch)

    @torch.no_grad()
    def frozen_policy_token_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token log-probs of the completions under the current policy, without gradients. (B, T-1)"""
        return token_logprobs(self.model_wrapped, **batch)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward, clip, step, schedule; one global step."""
        self.accelerator.backward(loss)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model_wrapped.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self._weights_version += 1

    # ---- checkpoints -----------------------------------------------------------------------------

    def _save_round_checkpoint(self, round_index: int) -> None:
        """Model, optimizer, scheduler and trainer state, written to a temporary folder, checksummed, then
        renamed: a folder under its final name is whole and verifiable (klalign.runs.integrity)."""
        final = Path(self.args.output_dir) / f"checkpoint-round-{round_index:05d}"
        tmp = final.with_name(f".tmp-{final.name}")
        if self.args.should_save and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        with quiet_saving():
            self.save_model(str(tmp), _internal_call=True)  # private: klalign.internals
            self._save_optimizer_and_scheduler(str(tmp))  # private: klalign.internals
        self.accelerator.wait_for_everyone()  # every process has written its shards before the checksums
        if self.args.should_save:
            self.state.save_to_json(str(tmp / "trainer_state.json"))
            (tmp / "online_round.json").write_text(json.dumps({"round": round_index}))
            write_checksums(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate_round_checkpoints()
        self.accelerator.wait_for_everyone()

    def _rotate_round_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        for old in round_checkpoints(self.args.output_dir)[limit:]:  # newest first
            shutil.rmtree(old, ignore_errors=True)


class quiet_saving:
    """Saving prints nothing unless something is wrong: no "Writing model shards" bars, no deprecation
    warnings that transformers and DeepSpeed repeat at every save."""

    def __enter__(self):
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        if self._bars:
            hf_logging.enable_progress_bar()
        self._warnings.__exit__(*exc)

