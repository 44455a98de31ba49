"""TOVA: evict the tokens the newest query attends to least."""

from dataclasses import dataclass

import torch

from hf_kvcache.policies.base import EvictionPolicy, Needs, Step, register_policy


@register_policy("tova", "TOVA: keep the tokens the latest query attends to most")
@dataclass(frozen=True)
class TOVA(EvictionPolicy):
    """Keeps the `budget` tokens the latest query attends to most (when a chunk of several tokens arrives,
    its last query decides); no state, and the newest tokens compete like all others.

    Source: Oren et al. 2024, "Transformers are Multi-State RNNs", https://arxiv.org/abs/2401.06104.

    Args:
        budget: tokens kept per layer and KV head.
        per_head: False (the paper's choice): every head of a layer keeps the same tokens, ranked by the
            attention averaged over all query heads. True: each KV head keeps its own tokens.
    """

    per_head: bool = False
    needs = Needs.LAST_QUERIES

    def scored_queries(self, query_length: int) -> int:
        return 1

    def score(self, step: Step) -> torch.Tensor:
        return step.attention
