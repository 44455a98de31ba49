"""SnapKV: compress the prompt once, using the attention of its last queries (the observation window)."""

from dataclasses import dataclass

import torch

from hf_kvcache.policies.base import EvictionPolicy, Needs, Step, keep_top, register_policy
from hf_kvcache.validation import check_choice, check_int

POOLINGS = ("max", "avg")
MAX_KERNEL_SIZE = 1023  # the paper pools over 5 or 7; the pooling costs kernel_size per stored token


def check_kernel_size(kernel_size: object) -> None:
    """A pooling width over held tokens: an odd integer in 1 .. `MAX_KERNEL_SIZE` (a ValueError otherwise)."""
    check_int("kernel_size", kernel_size, 1, MAX_KERNEL_SIZE, hint="an odd pooling width")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size!r} must be an odd integer between 1 and {MAX_KERNEL_SIZE}")


def pool_neighbours(scores: torch.Tensor, kernel_size: int, pooling: str = "max") -> torch.Tensor:
    """`scores` [batch, heads, tokens] pooled ("max" or "avg", padding not counted) over `kernel_size` neighbouring
    tokens, same shape: a token scores as its best (or average) neighbourhood, so neighbours of important tokens
    are kept with them."""
    rows, padding = scores.flatten(0, 1)[:, None], kernel_size // 2
    if pooling == "max":
        pooled = torch.nn.functional.max_pool1d(rows, kernel_size, stride=1, padding=padding)
    else:
        pooled = torch.nn.functional.avg_pool1d(rows, kernel_size, stride=1, padding=padding, count_include_pad=False)
    return pooled.view_as(scores)


@register_policy("snapkv", "SnapKV: compress each prompt by observation-window attention")
@dataclass(frozen=True)
class SnapKV(EvictionPolicy):
    """After a multi-token forward (a prompt, or a chunk of one) that leaves more than `budget` tokens,
    keeps the observation window (the forward's last `observation_window` tokens) and the earlier tokens
    whose window attention, pooled over `kernel_size` neighbouring tokens, is highest. Single-token
    decoding steps never evict: the cache grows, as in the paper.

    Source: Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
    https://arxiv.org/abs/2404.14469.

    Args:
        budget: tokens kept per layer and KV head after a prompt is compressed.
        per_head: each KV head keeps its own tokens (True) or all heads keep the same tokens (False).
        observation_window: the prompt's last tokens whose queries vote (and which are always kept).
        kernel_size: odd width of the pooling over positions, which keeps neighbours of important tokens
            (at most `MAX_KERNEL_SIZE`, 1023: each eviction pools kernel_size scores per stored token).
        pooling: "max" or "avg" (the SnapKV code's default is "avg" with kernel 5; "max" with kernel 7
            found most pass keys on SmolLM2, see README).

    Raises:
        ValueError: a field out of range (named, with what is accepted); a `compaction_interval` other than 1
            (decoding steps never evict).
    """

    observation_window: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    needs = Needs.LAST_QUERIES
    evicts_while_decoding = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("observation_window", self.observation_window, minimum=1)
        self.check_within_budget(observation_window=self.observation_window)
        check_kernel_size(self.kernel_size)
        check_choice("pooling", self.pooling, POOLINGS)

    def scored_queries(self, query_length: int) -> int:
        return min(self.observation_window, query_length)

    def should_evict(self, query_length: int, stored: int, layer_budget: int) -> bool:
        return query_length > 1 and stored > layer_budget

    def score(self, step: Step) -> torch.Tensor:
        """The window attention pooled over neighbours, for the tokens before the window (the window's own
        tokens are kept anyway, and do not pool into their neighbours)."""
        window = self.scored_queries(step.query_length)
        pooled = pool_neighbours(step.attention[..., : step.stored - window], self.kernel_size, self.pooling)
        return torch.cat([pooled, step.attention[..., step.stored - window :]], dim=-1)

    def select(self, step: Step, budget: int) -> torch.Tensor:
        window = self.scored_queries(step.query_length)
        return keep_top(step, self.score(step), budget, self.per_head, recent=window)
