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
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object, is_peft_model
from tqdm.auto import tqdm
from transformers import Trainer, TrainerState
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import TrainOutput

import klalign
from klalign.data.datasets import validate_prompt_dataset
from klalign.generation.sample import sample_completions
from klalign.generation.sampler_check import SamplerLogprobCheck
from klalign.generation.types import GenerationArguments
from klalign.models.placement import decided_on_main, prepare_frozen
from klalign.models.reference import Reference
from klalign.ops.batching import completion_batch
from klalign.ops.importance import at_scored_positions, sample_statistics
from klalign.ops.logprobs import sequence_logprobs, token_logprobs
from klalign.ops.modules import disable_dropout, evaluation_mode
from klalign.runs.feedback import FeedbackStore
from klalign.runs.manifest import (
    MANIFEST,
    args_settings,
    check_or_write,
    digest,
    model_fingerprint,
)
from klalign.runs.resume import ResumePlan, describe, plan_resume
from klalign.runs.round_checkpoints import save_round_checkpoint
from klalign.runs.seeding import derived_seed, seed_everything
from klalign.trainers.guards import stop_if_not_finite, warn_if_far
from klalign.trainers.online_config import OnlineConfig
from klalign.trainers.schedule import RoundClock, advance, schedule_length

ROUND_SUMMARY = ("loss", "kl_k3", "main_reward", "oracle_reward", "win_rate/vs_reference", "oracle_queries")


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
        if args.disable_dropout:  # after the adapter is added: LoRA's dropout too
            for module in (model, ref_model):
                if module is not None:
                    disable_dropout(module)
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
        self.sampler_check = SamplerLogprobCheck(args.vllm_logprob_tolerance)  # this round's checks of vLLM's log-probs
        # fp32 end to end: HF's sampler log-probs equal a frozen pass to float rounding (`policy_token_logprobs`)
        self._fp32 = self.accelerator.mixed_precision == "no" and all(
            p.dtype == torch.float32 for p in self.model.parameters())
        self.clock = RoundClock()  # where the learning-rate schedule is within the run
        self.round_schedule = True  # False: a subclass's scheduler steps once per optimizer step

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
        """Optimizer steps per round, before the round's data is in (`begin_update` gives the exact count)."""
        return 1

    def begin_update(self, num_steps: int) -> None:
        """Called by `update` with the number of optimizer steps it is about to take: the learning-rate
        schedule spreads the round's share of the run over exactly those steps."""
        self.clock.begin(self.clock.round_index, num_steps)

    # ---- the loop --------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        resuming = resume_from_checkpoint not in (None, False) and str(resume_from_checkpoint).lower() != "false"
        plan = decided_on_main(lambda: self._plan(resume_from_checkpoint, resuming))  # before anything is sampled
        checkpoint = plan.checkpoint
        if checkpoint is not None and not self.is_deepspeed_enabled:
            self._load_from_checkpoint(checkpoint)  # private: klalign.internals
        max_steps = schedule_length(self.args.num_rounds)  # the schedule runs over rounds (klalign.trainers.schedule)
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
            self.clock.begin(round_index, self.steps_per_round())  # refined by `begin_update` with the exact count
            metrics = {"round": round_index, **self.update(round_index, rows)}
            for name, value in self.sampler_check.metrics().items():
                metrics.setdefault(name, value)  # a full pass's mismatch, where one ran, is the better measurement
            if self.round_schedule:
                advance(self.lr_scheduler, self.clock.end())
            stop_if_not_finite(self.accelerator, f"round {round_index}", **{
                k: v for k, v in metrics.items() if k in ("loss", "kl_k1", "kl_k3") and isinstance(v, (int, float))})
            warn_if_far(metrics, round_index, self.args.kl_warning_threshold)
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
        stored = decided_on_main(lambda: self.store.chunk(round_index, chunk_index))  # one view of the store
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

    def stored_rows(self, rounds) -> list[dict]:
        """The stored rows of earlier rounds, as the main process reads them (every process trains on the
        same rows even where a shared filesystem shows processes different views)."""
        rounds = list(rounds)
        return decided_on_main(lambda: [row for r in rounds for row in self.store.round_rows(r)])

    def generate(self, prompts: list, num_samples: int, temperature: float | None = None, weights=None):
        """Sampled completions (token ids kept) from the policy, with the weights now in the model.

        With `generation_backend: vllm` the weights are pushed into this process's engine when they
        changed: `weights` names weights swapped in for the call (another iterate: their own name);
        by default they are the trainer's current ones (`weights_changed` marks every change)."""
        args = self.args.generation_args(temperature)
        engine = self.vllm_engine() if args.generation_backend == "vllm" else None
        samples = sample_completions(self.model_wrapped, self.processing_class, prompts, num_samples, args,
                                     accelerator=self.accelerator, progress=False, engine=engine,
                                     weights_key=self._weights_key(weights),
                                     sampler_logprobs=self._sampler_differs(args) or self._fp32)
        if engine is not None and self._fp32 and not self._sampler_differs(args):
            self.sampler_check.keep_if_close(samples, self._sampler_mismatch)  # vLLM's log-probs kept if they match
        return samples

    def _sampler_mismatch(self, completions: list) -> list[dict]:
        """`completions` rescored by the frozen policy pass against their sampler's log-probs
        (`klalign.ops.importance.sample_statistics` rows): what `SamplerLogprobCheck` compares."""
        batch = self.batch([c.prompt_ids for c in completions], [c.completion_ids for c in completions])
        return sample_statistics(self.frozen_policy_token_logprobs(batch), batch["completion_mask"],
                                 [c.sampler_logprobs for c in completions])

    def _weights_key(self, weights=None):
        """The name of weights, as `generate` and `policy_token_logprobs` take it: `weights`, or by default the
        trainer's current ones (a new name after every optimizer step and `weights_changed`)."""
        return ("current", self._weights_version) if weights is None else weights

    def _sampler_differs(self, args: GenerationArguments) -> bool:
        """Whether HF sampling should report its log-probs for the importance correction: when its law is not
        the training policy's (vLLM always reports them). At temperature 1 and top_p 1 HF samples from the
        policy itself, and reports them in fp32 so that they replace a frozen pass (`policy_token_logprobs`)."""
        return args.temperature != 1.0 or args.top_p != 1.0

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

    def policy_logprobs(self, batch: dict[str, torch.Tensor], pairs: bool = False) -> torch.Tensor:
        """`s(y)` under the policy, with gradients. `pairs`: the batch is TRL's pair layout, each pair's prompt run
        once where `share_prompt` is on (`klalign.ops.logprobs.token_logprobs`). (B,)"""
        return sequence_logprobs(self.model_wrapped, **batch, pairs=pairs and self.args.share_prompt)

    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`s_ref(y)` (`klalign.models.reference.Reference`). (B,)"""
        return self.reference.sequence_logprobs(self.model_wrapped, batch)

    def policy_token_logprobs(self, batch: dict[str, torch.Tensor], completions: list, weights=None) -> torch.Tensor:
        """Per-token log-probs of `completions` (the rows of `batch`, in order) under the policy weights named
        `weights` (as `generate` names them; None: the current ones), without gradients, in eval mode. (B, T-1)

        The one place that decides whether the frozen pass runs (issue 22, item 2). It is skipped when every
        completion was drawn by HF from the policy's own law (`Completion.sampler_is_model`: temperature 1,
        top_p 1, eval mode) with exactly these weights (`Completion.weights_key`: a round samples, then its
        update changes them; Nash iterates sample with swapped-in weights under other names), computing in
        fp32 (no mixed precision): the sampler's log-probs are then the policy's own, equal to a recompute to
        float rounding (1e-6 a token on the tiny model: tests/test_online_loop.py). vLLM's samples are marked so
        when their checked mismatch is within `vllm_logprob_tolerance` (`klalign.generation.sampler_check`). Otherwise (another
        temperature or top_p, vLLM beyond the tolerance, other weights, bf16) `frozen_policy_token_logprobs`."""
        if self.sampler_scored(completions, weights):
            kept = at_scored_positions([c.sampler_logprobs for c in completions], batch["completion_mask"])
            return kept.to(torch.float32)
        return self.frozen_policy_token_logprobs(batch)

    def sampler_scored(self, completions: list, weights=None) -> bool:
        """Whether the completions' sampler log-probs are the policy's under the weights named `weights`
        (`policy_token_logprobs`)."""
        key = self._weights_key(weights)
        return self._fp32 and bool(completions) and all(
            c.sampler_is_model and c.sampler_logprobs is not None and c.weights_key == key for c in completions)

    def frozen_policy_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`s(y)` under the current policy without gradients, in eval mode (no dropout). (B,)"""
        return self.frozen_policy_token_logprobs(batch).sum(dim=1)

    @torch.no_grad()
    def frozen_policy_token_logprobs(self, batch: dict[str, torch.Tensor], pairs: bool = False) -> torch.Tensor:
        """Per-token log-probs of the completions under the current policy, without gradients, in eval mode
        (no dropout: pi_old, anchors and KL estimates are the policy's own, not a random subnetwork's). (B, T-1)"""
        with evaluation_mode(self.model_wrapped):
            return token_logprobs(self.model_wrapped, **batch, pairs=pairs and self.args.share_prompt)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward, clip, step, schedule; one global step. A non-finite loss or gradient norm stops the run
        (klalign.trainers.guards) before the step is taken."""
        where = f"round {self.clock.round_index}, optimizer step {self.state.global_step + 1}"
        stop_if_not_finite(self.accelerator, where, loss=loss.detach().item())
        self.accelerator.backward(loss)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else math.inf
        norm = self.accelerator.clip_grad_norm_(self.model_wrapped.parameters(), max_norm)
        if norm is not None:  # DeepSpeed clips inside its step and reports no norm here
            stop_if_not_finite(self.accelerator, where, gradient_norm=float(norm))
        self.optimizer.step()
        if self.round_schedule:
            advance(self.lr_scheduler, self.clock.after_step())
        else:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self._weights_version += 1

    # ---- checkpoints -----------------------------------------------------------------------------

    def _save_round_checkpoint(self, round_index: int) -> None:
        save_round_checkpoint(self, round_index)
