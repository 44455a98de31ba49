"""H2O (heavy hitters): keep the tokens that received the most attention so far, plus recent ones."""

import torch
from transformers import PreTrainedConfig

from hf_kvcache.caches.scored import ScoredCache, ScoredLayer, check_budget
from hf_kvcache.caches.storage import TensorMap
from hf_kvcache.registry import register_cache


class HeavyHitterLayer(ScoredLayer):
    """Accumulates, per kept token and KV head, the attention it received from every later query.

    When more than `budget` tokens are held, keeps the `recent` newest tokens and the
    `budget - recent` older tokens with the highest accumulated attention.
    """

    def __init__(self, budget: int, recent: int):
        super().__init__(budget)
        self.recent = recent
        self.scores: torch.Tensor | None = None  # float32 [batch, kv_heads, stored]

    def queries_needed(self, query_length: int) -> int:
        return query_length

    def select(self, scores: torch.Tensor | None) -> torch.Tensor | None:
        if self.scores is not None:  # tokens new in this forward start from zero
            scores = scores + torch.nn.functional.pad(self.scores, (0, scores.shape[-1] - self.scores.shape[-1]))
        self.scores = scores
        stored = self.scores.shape[-1]
        if stored <= self.budget:
            return None
        older = stored - self.recent
        heavy = self.scores[..., :older].topk(self.budget - self.recent, dim=-1).indices
        recent = torch.arange(older, stored, device=scores.device).expand(*heavy.shape[:2], -1)
        return torch.cat([heavy, recent], dim=-1)

    def keep(self, indices: torch.Tensor) -> None:
        super().keep(indices)
        self.scores = self.scores.gather(2, indices)

    def map_state(self, fn: TensorMap) -> None:
        if self.scores is not None:
            self.scores = fn(self.scores)

    def reset(self) -> None:
        super().reset()
        self.scores = None


class HeavyHitterCache(ScoredCache):
    """H2O: a drop-in `Cache` keeping `budget` tokens per layer and KV head, in prefill and decoding.

    Args:
        config: the model config (decoder LM).
        budget: tokens kept per layer and KV head.
        recent: of those, the newest tokens always kept (the rest are the heavy hitters).
        bits: must be None (full precision); see `caches/scored.py`.

    Needs `hf_kvcache.enable_score_capture(model)`. Each KV head keeps its own tokens, ranked by the
    attention they received summed over queries and averaged over the query heads sharing that KV head.
    """

    def __init__(self, config: PreTrainedConfig, budget: int = 256, recent: int = 32, bits: int | None = None):
        check_budget(budget, recent=recent)
        self.budget, self.recent = budget, recent
        super().__init__(config, bits)

    def full_attention_layer(self) -> HeavyHitterLayer:
        return HeavyHitterLayer(self.budget, self.recent)


register_cache("h2o", HeavyHitterCache, "H2O: heavy hitters by accumulated attention + recent tokens (score capture)")
