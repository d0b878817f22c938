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


# ----------------------------------------------------------------------------- a launched process's life
#
# Under `accelerate launch` / `torchrun` each process is a child of the launcher (torch elastic starts it in a
# session of its own, so a terminal's signals do not reach it either). Two things keep such a process from
# outliving the run: it asks the kernel for SIGTERM when the launcher dies (`exit_with_launcher`), and it
# closes the process group in an order that never waits on a departed peer (`close_distributed`).

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
CLOSE_TIMEOUT_S = 1800.0  # torch's default collective timeout: how long a process waits for the others at the end
ERROR_CLOSE_TIMEOUT_S = 60.0  # after an error: processes that fail together meet in seconds; a lone failure goes


def launched_by_a_launcher() -> bool:
    """This process was started by torchrun / `accelerate launch` (torch elastic) or a launcher that sets
    LOCAL_RANK (DeepSpeed's); a plain `python recipes/dpo.py` (or accelerate's one-process launch) was not."""
    import os

    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _is_a_launcher(pid: int) -> bool:
    """Process `pid` runs Python or a launcher's console script (when a container's PID 1 is torchrun itself)."""
    import os

    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            program = os.path.basename(file.read().split(b"\0")[0].decode(errors="replace"))
    except OSError:
        return False
    return program.startswith("python") or program in ("torchrun", "accelerate", "deepspeed")


def exit_with_launcher(signum: int | None = None) -> bool:
    """Ask the kernel to send this process `signum` (SIGTERM) when its parent, the launcher, dies.

    Without it, a launcher killed with SIGKILL (a CI timeout, the OOM killer) leaves its workers running,
    orphaned: one once sat for 20 minutes in a gloo destructor after the launcher was gone. Only Linux has
    `prctl(PR_SET_PDEATHSIG)`; elsewhere, and in a process no launcher started, this does nothing and returns
    False. The request covers the parent at the time it is made: if the launcher died before (the process
    was re-parented to init), no signal would ever come, so the process sends itself the signal now.
    """
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux") or not launched_by_a_launcher():
        return False
    signum = signal.SIGTERM if signum is None else signum
    parent = os.getppid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return False
    orphaned = parent == 1 and not _is_a_launcher(1)  # re-parented to init before the request
    if orphaned or os.getppid() != parent:  # ... or the launcher died between getppid and prctl
        os.kill(os.getpid(), signum)
    return True


def close_timeout() -> float:
    """Seconds a process waits at the closing barrier for the others (KLALIGN_CLOSE_TIMEOUT, default 1800)."""
    import os

    return float(os.environ.get("KLALIGN_CLOSE_TIMEOUT", CLOSE_TIMEOUT_S))


def _detach_ddp_models() -> int:
    """DDP models something still holds after the run (a global, a cache) lose their reducer, its logger and
    their process group now; returns how many were detached."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    detached = 0
    for obj in gc.get_objects():
        if issubclass(type(obj), DistributedDataParallel):  # type(), not isinstance: no proxy's __class__ runs
            for name in ("logger", "reducer", "process_group"):  # the logger holds the reducer too
                obj.__dict__.pop(name, None)
            detached += 1
    return detached


def _release_default_arguments(group) -> int:
    """Functions whose default argument is `group` get None (the default group) instead.

    `def barrier(self, group=torch.distributed.GroupMember.WORLD)` (DeepSpeed's TorchBackend; also
    torch.distributed.nn's collectives) evaluates the world group when its module is imported: imported
    after the group was created, it holds the group until the interpreter's own shutdown, in whatever
    order that frees things, and `destroy_process_group` then unregisters the group without ending it.
    """
    import gc
    import types

    released = 0
    for fn in gc.get_objects():
        if type(fn) is not types.FunctionType:
            continue
        if fn.__defaults__ and any(value is group for value in fn.__defaults__):
            fn.__defaults__ = tuple(None if value is group else value for value in fn.__defaults__)
            released += 1
        if fn.__kwdefaults__ and any(value is group for value in fn.__kwdefaults__.values()):
            fn.__kwdefaults__ = {k: None if v is group else v for k, v in fn.__kwdefaults__.items()}
            released += 1
    return released


def close_distributed(timeout: float | None = None) -> bool:
    """End this process's part of a launched run so that nothing waits on a process that has gone.

    Returns True when there was no process group or it was closed; False when the others did not all reach
    the closing barrier within `timeout` seconds (default `close_timeout()`), or it failed: the group was
    then left alone, and the caller should exit at once (`os._exit`), since ending the group would join
    its threads, one of which may still wait in that barrier for the group's whole timeout.

    The order, and why no step can wait on a departed peer:
    1. Hold the world group. A DDP reducer holds it from C++ (a `std::shared_ptr` pybind holder, freed with
       the GIL held), and when the reducer is the group's last owner, freeing it runs gloo's destructor,
       which joins the worker threads with the GIL held: a worker that needs the GIL to finish its last
       collective (a Python callback on its future, say) never can, and the process hangs for good (that
       hang, reproduced by tests/scripts/late_collective.py: rank 1 in `~ProcessGroupGloo` from
       `Reducer::~Reducer`, a `pt_gloo_runloop` thread in `take_gil`, its peer gone). It happens when the
       group is destroyed while a DDP model still lives, as `Accelerator.end_training()` inside `main()` does.
       While this reference lives, freeing a reducer only counts down.
    2. Collect garbage: the run's objects in reference cycles (trainer, accelerator, wrapped model) go,
       and with them the DDP reducers; a DDP model something still holds loses its reducer and group.
    3. Barrier, bounded by `timeout`. It completes only once every process has finished every collective
       it started (gloo runs a barrier after the work queued before it), so afterwards no thread of the
       group waits on another process. Peers are all still alive while they are in it.
    4. Destroy the process group, and release what still holds it (default arguments captured at import).
       Nothing in destroying a gloo group talks to the other processes.
    5. Drop the last reference: the group's Python holder releases the GIL before the destructor joins its
       (now idle) threads, so they end here, not during interpreter shutdown in arbitrary order.
    """
    import gc
    from datetime import timedelta

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    world = dist.group.WORLD  # 1
    gc.collect()  # 2
    _detach_ddp_models()  # (their reducers are freed at once: a reducer is in no cycle)
    try:  # 3
        dist.barrier(async_op=True).wait(timeout=timedelta(seconds=close_timeout() if timeout is None else timeout))
    except Exception as error:  # a timeout, or the connection to a departed process reset
        import sys

        print(f"klalign: the processes did not all reach the end of the run ({str(error).splitlines()[0]}); "
              "leaving the process group as it is", file=sys.stderr, flush=True)
        return False
    dist.destroy_process_group()  # 4
    _release_default_arguments(world)
    del world  # 5
    return True


def exit_now(status: int) -> None:
    """Exit with `status` without running destructors or exit handlers (after a failed `close_distributed`)."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def run_launched(main, *args):
    """`main(*args)` as one process of a launched run: it dies with its launcher (`exit_with_launcher`), and
    whether `main` returns or raises, the process group is closed before the interpreter shuts down
    (`close_distributed`). Returns what `main` returns, or re-raises what it raised (its frames' locals
    cleared first, so a failed run's trainer does not outlive the group); a process that cannot close the
    group cleanly exits at once with status 1 (the traceback printed first, if `main` raised)."""
    import traceback

    exit_with_launcher()
    try:
        result = main(*args)
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)  # main's locals (a trainer, its DDP model) go now
        if not close_distributed(min(ERROR_CLOSE_TIMEOUT_S, close_timeout())):
            traceback.print_exception(error)
            exit_now(1)
        raise
    if not close_distributed():
        exit_now(1)
    return result
