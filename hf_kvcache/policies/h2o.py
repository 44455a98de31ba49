"""H2O (heavy hitters): keep the tokens that received the most attention so far, plus recent ones."""

from dataclasses import dataclass

import torch

from hf_kvcache.policies.base import EvictionPolicy, Needs, Step, keep_top, register_policy
from hf_kvcache.validation import check_choice

ACCUMULATIONS = ("sum", "mean")


@register_policy("h2o", "H2O: heavy hitters by accumulated attention + recent tokens")
@dataclass(frozen=True)
class H2O(EvictionPolicy):
    """Keeps the `recent` newest tokens and the `budget - recent` older tokens that received the most
    attention from every later query, in prefill and decoding.

    Source: Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", https://arxiv.org/abs/2306.14048.

    Args:
        budget: tokens kept per layer and KV head.
        per_head: each KV head keeps its own tokens (True, H2O) or all heads keep the same tokens, ranked
            by the attention averaged over all query heads (False).
        recent: newest tokens always kept; None: half the budget, the H2O paper's split.
        accumulate: "sum" ranks by attention summed over queries (H2O); "mean" divides it by the number of
            queries that could attend the token, which removes the advantage of early tokens.
    """

    recent: int | None = None
    accumulate: str = "sum"
    needs = Needs.EVERY_QUERY

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recent is None:
            object.__setattr__(self, "recent", self.budget // 2)
        self.check_within_budget(recent=self.recent)
        check_choice("accumulate", self.accumulate, ACCUMULATIONS)

    def update_state(self, step: Step) -> None:
        # Tokens new in this forward, and tokens held before the first scored forward (a restored
        # prefix), start from zero.
        held = step.stored - step.query_length
        received = step.state.get("attention", step.attention.new_zeros((*step.attention.shape[:2], held)))
        step.state["attention"] = step.attention + torch.nn.functional.pad(received, (0, step.query_length))

    def score(self, step: Step) -> torch.Tensor:
        received = step.state["attention"]
        if self.accumulate == "sum":
            return received
        # A token seen at position p was attended by the queries at positions p .. seen - 1.
        observers = (step.seen - step.positions[:, : received.shape[1]]).float()
        return received / observers

    def select(self, step: Step, budget: int) -> torch.Tensor:
        return keep_top(step, self.score(step), budget, self.per_head, recent=self.recent)
