"""PyramidKV: SnapKV's selection with budgets that shrink with depth."""

from dataclasses import dataclass

from hf_kvcache.policies.base import register_policy
from hf_kvcache.policies.snapkv import SnapKV
from hf_kvcache.validation import check_int


@register_policy("pyramidkv", "PyramidKV: SnapKV with per-layer budgets shrinking with depth")
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV's selection, with the per-layer budgets of a pyramid: the first layer keeps the most tokens,
    the last the fewest (`budget / beta`, at least the observation window), in an arithmetic sequence
    whose mean is `budget` (the same total as SnapKV at `budget`).

    Source: Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling", https://arxiv.org/abs/2406.02069.

    Args:
        beta: the first-to-last budget ratio's control: the last layer keeps `budget // beta` tokens.
        (the others as in `SnapKV`)
    """

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("beta", self.beta, minimum=1)

    def layer_budget(self, layer_index: int, num_layers: int) -> int:
        smallest = max(self.budget // self.beta, self.observation_window)
        largest = 2 * self.budget - smallest
        if num_layers == 1:
            return self.budget
        return round(largest - (largest - smallest) * layer_index / (num_layers - 1))
