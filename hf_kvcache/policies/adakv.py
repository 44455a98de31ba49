"""Ada-KV: SnapKV's scores, with the layer's budget shared among its heads (ragged per-head storage)."""

from dataclasses import dataclass

import torch

from hf_kvcache.policies.base import Step, check_scores, register_policy
from hf_kvcache.policies.snapkv import SnapKV
from hf_kvcache.validation import check_number


@register_policy("adakv", "Ada-KV: SnapKV with head-adaptive budgets, heads hold different token counts")
@dataclass(frozen=True)
class AdaKV(SnapKV):
    """Head-adaptive budgets: a layer keeps `budget x KV heads` tokens per batch row, as SnapKV does, but
    chosen by the SnapKV score across all its heads at once, so heads with concentrated attention give
    tokens to heads with spread attention. Every head keeps at least `safeguard x budget` tokens (and
    its observation window). Heads then hold different numbers of tokens, and only those are stored
    (`caches/ragged.py`): memory is freed, not masked.

    Source: Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
    Efficient LLM Inference", https://arxiv.org/abs/2407.11550 (Ada-SnapKV).

    Args:
        safeguard: the fraction of `budget` every head keeps whatever its scores (the paper's alpha, 0.2);
            1.0 gives every head exactly `budget` tokens (SnapKV).
        (the others as in `SnapKV`; `per_head` must be True)
    """

    safeguard: float = 0.2
    ragged = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("safeguard", self.safeguard, minimum=0.0, inclusive=True)
        if self.safeguard > 1 or not self.per_head:
            raise ValueError(
                f"safeguard={self.safeguard!r}, per_head={self.per_head!r}: Ada-KV shares the budget among heads "
                "(per_head=True) and guarantees each head a fraction safeguard <= 1 of it"
            )

    def select(self, step: Step, budget: int) -> torch.Tensor:
        """bool [batch, heads, stored]: `budget x heads` tokens per row, at least the guaranteed share per head."""
        window = self.scored_queries(step.query_length)
        scores = check_scores(step, self.score(step)).masked_fill(~step.real, float("-inf"))
        scores[..., step.stored - window :] = float("inf")  # the observation window (real: it ends the prompt)
        batch, heads, stored = scores.shape
        guaranteed = max(window, min(budget, round(self.safeguard * budget)))
        rank = torch.empty_like(scores, dtype=torch.long)
        order = scores.sort(dim=-1, descending=True, stable=True).indices
        rank.scatter_(-1, order, torch.arange(stored, device=scores.device).expand_as(order))
        keep = rank < guaranteed
        shared = scores.masked_fill(keep, float("-inf")).flatten(1)  # the rest compete across heads
        extra = min(budget * heads - guaranteed * heads, shared.shape[-1])
        chosen = shared.sort(dim=-1, descending=True, stable=True).indices[:, :extra]
        keep.view(batch, -1).scatter_(-1, chosen, True)
        return keep
