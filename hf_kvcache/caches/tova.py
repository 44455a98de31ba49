"""TOVA: evict the tokens the newest query attends to least."""

import torch
from transformers import PreTrainedConfig

from hf_kvcache.caches.base import Storage
from hf_kvcache.caches.scored import ScoredCache, ScoredLayer, check_budget
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.registry import register_cache


class TOVALayer(ScoredLayer):
    """When more than `budget` tokens are held, keeps the `budget` tokens with the highest attention
    from the latest query. No state is carried."""

    def queries_needed(self, query_length: int) -> int:
        return 1 if self.stored_tokens > self.budget else 0

    def select(self, scores: torch.Tensor | None) -> torch.Tensor | None:
        return None if scores is None else scores.topk(self.budget, dim=-1).indices


class TOVACache(ScoredCache):
    """TOVA (Token Omission Via Attention): a drop-in `Cache` keeping `budget` tokens per layer and KV head.

    Source: Oren et al. 2024, "Transformers are Multi-State RNNs", https://arxiv.org/abs/2401.06104.

    Args:
        config: the model config (decoder LM).
        budget: tokens kept per layer and KV head.
        per_head: False (the TOVA paper's choice): every head of a layer keeps the same tokens, ranked by
            the latest query's attention averaged over all query heads. True: each KV head keeps its own
            tokens, ranked by the attention of its query heads.
        bits, group_size, residual_length, rotate: storage of the kept tokens, see `ScoredCache`.

    Needs `hf_kvcache.enable_score_capture(model)`. When a chunk of several tokens arrives, the last
    query of the chunk decides. The newest tokens compete like all others (none is kept by force).
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        budget: int = 256,
        per_head: bool = False,
        bits: int | None = None,
        group_size: int | None = None,
        residual_length: int = 128,
        rotate: bool = True,
    ):
        check_budget(budget)
        self.budget = budget
        super().__init__(config, per_head, bits, group_size, residual_length, rotate)

    def full_attention_layer(self, layer: LayerGeometry, storage: Storage) -> TOVALayer:
        return TOVALayer(layer, self.budget, storage, self.per_head)


register_cache("tova", TOVACache, "TOVA: keep the tokens the latest query attends to most (score capture)")
