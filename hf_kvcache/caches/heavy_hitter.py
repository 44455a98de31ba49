"""H2O (heavy hitters): keep the tokens that received the most attention so far, plus recent ones."""

import torch
from transformers import PreTrainedConfig

from hf_kvcache.caches.base import FULL_PRECISION, Storage
from hf_kvcache.caches.scored import ScoredCache, ScoredLayer, check_budget
from hf_kvcache.caches.storage import TensorMap
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.registry import register_cache
from hf_kvcache.validation import check_choice

ACCUMULATIONS = ("sum", "mean")


class HeavyHitterLayer(ScoredLayer):
    """Accumulates, per kept token and KV head, the attention it received from every later query.

    When more than `budget` tokens are held, keeps the `recent` newest tokens and the
    `budget - recent` older tokens that rank highest: by attention summed over queries
    (`accumulate="sum"`, H2O) or by its mean over the queries that could see the token ("mean").
    """

    def __init__(
        self,
        geometry: LayerGeometry,
        budget: int,
        recent: int,
        accumulate: str = "sum",
        storage: Storage = FULL_PRECISION,
        per_head: bool = True,
    ):
        super().__init__(geometry, budget, storage, per_head)
        self.recent, self.accumulate = recent, accumulate
        self.scores: torch.Tensor | None = None  # float32 [batch, heads, stored]: attention received
        self.observers: torch.Tensor | None = None  # float32, same shape: queries that could attend each token

    def queries_needed(self, query_length: int) -> int:
        return query_length

    def select(self, scores: torch.Tensor | None) -> torch.Tensor | None:
        new = self.query_length
        observers_of_new = torch.arange(new, 0, -1, dtype=torch.float32, device=scores.device).expand(
            *scores.shape[:2], -1
        )
        if self.scores is None:  # tokens held before the first scored forward (a restored prefix) start from zero
            self.scores = self.observers = scores.new_zeros((*scores.shape[:2], scores.shape[-1] - new))
        # tokens new in this forward start from zero
        self.scores = scores + torch.nn.functional.pad(self.scores, (0, new))
        self.observers = torch.cat([self.observers + new, observers_of_new], dim=-1)
        stored = self.scores.shape[-1]
        if stored <= self.budget:
            return None
        rank = self.scores if self.accumulate == "sum" else self.scores / self.observers
        older = stored - self.recent
        heavy = rank[..., :older].topk(self.budget - self.recent, dim=-1).indices
        recent = torch.arange(older, stored, device=scores.device).expand(*heavy.shape[:2], -1)
        return torch.cat([heavy, recent], dim=-1)

    def keep(self, indices: torch.Tensor) -> None:
        super().keep(indices)
        self.scores, self.observers = self.scores.gather(2, indices), self.observers.gather(2, indices)

    def map_state(self, fn: TensorMap) -> None:
        if self.scores is not None:
            self.scores, self.observers = fn(self.scores), fn(self.observers)

    def reset(self) -> None:
        super().reset()
        self.scores = self.observers = None


class HeavyHitterCache(ScoredCache):
    """H2O: a drop-in `Cache` keeping `budget` tokens per layer and KV head, in prefill and decoding.

    Source: Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", https://arxiv.org/abs/2306.14048.

    Args:
        config: the model config (decoder LM).
        budget: tokens kept per layer and KV head.
        recent: of those, the newest tokens always kept (the rest are the heavy hitters); None: half
            the budget, the H2O paper's split.
        accumulate: "sum" ranks older tokens by the attention they received summed over queries (H2O);
            "mean" divides it by the number of queries that could attend the token, which removes the
            advantage of early tokens (measured better on perplexity and passkey retrieval, see README).
        per_head: each KV head keeps its own tokens (True, H2O) or all heads keep the same tokens,
            ranked by the attention averaged over all query heads (False).
        bits, group_size, residual_length, rotate: storage of the kept tokens, see `ScoredCache`.

    Needs `hf_kvcache.enable_score_capture(model)`. Attention is averaged over the query heads sharing
    each KV head.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        budget: int = 256,
        recent: int | None = None,
        accumulate: str = "sum",
        per_head: bool = True,
        bits: int | None = None,
        group_size: int | None = None,
        residual_length: int = 128,
        rotate: bool = True,
    ):
        check_budget(budget)
        recent = budget // 2 if recent is None else recent
        check_budget(budget, recent=recent)
        check_choice("accumulate", accumulate, ACCUMULATIONS)
        self.budget, self.recent, self.accumulate = budget, recent, accumulate
        super().__init__(config, per_head, bits, group_size, residual_length, rotate)

    def full_attention_layer(self, layer: LayerGeometry, storage: Storage) -> HeavyHitterLayer:
        return HeavyHitterLayer(layer, self.budget, self.recent, self.accumulate, storage, self.per_head)


register_cache("h2o", HeavyHitterCache, "H2O: heavy hitters by accumulated attention + recent tokens (score capture)")
