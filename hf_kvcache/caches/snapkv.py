"""SnapKV: compress the prompt once, using the attention of its last queries (the observation window)."""

import torch
from transformers import PreTrainedConfig

from hf_kvcache.caches.base import FULL_PRECISION, Storage
from hf_kvcache.caches.scored import ScoredCache, ScoredLayer, check_budget
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.registry import register_cache
from hf_kvcache.validation import check_choice, check_int

POOLINGS = ("max", "avg")


class SnapKVLayer(ScoredLayer):
    """After a multi-token forward (a prompt, or a chunk of one) that leaves more than `budget` tokens,
    keeps the observation window (the forward's last `observation_window` tokens) and the
    `budget - window` earlier tokens whose window attention, pooled (max or average) over
    `kernel_size` neighbouring tokens, is highest. Single-token decoding steps never evict: the cache grows."""

    def __init__(
        self,
        geometry: LayerGeometry,
        budget: int,
        observation_window: int,
        kernel_size: int,
        pooling: str = "max",
        storage: Storage = FULL_PRECISION,
        per_head: bool = True,
    ):
        super().__init__(geometry, budget, storage, per_head)
        self.observation_window, self.kernel_size, self.pooling = observation_window, kernel_size, pooling

    def window(self) -> int:
        return min(self.observation_window, self.query_length)

    def queries_needed(self, query_length: int) -> int:
        return self.window() if query_length > 1 and self.stored_tokens > self.budget else 0

    def select(self, scores: torch.Tensor | None) -> torch.Tensor | None:
        if scores is None:
            return None
        stored, window = scores.shape[-1], self.window()
        prefix = scores[..., : stored - window]
        rows, padding = prefix.flatten(0, 1)[:, None], self.kernel_size // 2
        if self.pooling == "max":
            pooled = torch.nn.functional.max_pool1d(rows, self.kernel_size, stride=1, padding=padding)
        else:
            pooled = torch.nn.functional.avg_pool1d(
                rows, self.kernel_size, stride=1, padding=padding, count_include_pad=False
            )
        pooled = pooled.view_as(prefix)
        chosen = pooled.topk(self.budget - window, dim=-1).indices
        recent = torch.arange(stored - window, stored, device=scores.device).expand(*chosen.shape[:2], -1)
        return torch.cat([chosen, recent], dim=-1)


class SnapKVCache(ScoredCache):
    """SnapKV: a drop-in `Cache` that compresses each prompt (or prompt chunk) to `budget` tokens per
    layer and KV head.

    Source: Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
    https://arxiv.org/abs/2404.14469.

    Args:
        config: the model config (decoder LM).
        budget: tokens kept per layer and KV head after a prompt is compressed.
        observation_window: the prompt's last tokens whose queries vote (and which are always kept).
        kernel_size: odd width of the pooling over token positions, which keeps neighbours of
            important tokens together.
        pooling: "max" or "avg" (the SnapKV code offers both; "avg" with kernel 5 is its default, and
            found no pass key on SmolLM2 where "max" with kernel 7 found most, see README).
        per_head: each KV head keeps its own tokens (True, SnapKV) or all heads keep the same tokens,
            ranked by the window attention averaged over all query heads (False).
        bits, group_size, residual_length, rotate: storage of the kept tokens, see `ScoredCache`.

    Decoding grows the cache: tokens generated after the prompt are all kept, as in the SnapKV
    paper. Feeding text in chunks (several tokens per forward) compresses after every chunk, with that
    chunk's last queries as the observation window. Needs `hf_kvcache.enable_score_capture(model)`.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        budget: int = 256,
        observation_window: int = 32,
        kernel_size: int = 7,
        pooling: str = "max",
        per_head: bool = True,
        bits: int | None = None,
        group_size: int | None = None,
        residual_length: int = 128,
        rotate: bool = True,
    ):
        check_budget(budget, observation_window=observation_window)
        check_int("observation_window", observation_window, minimum=1)
        check_int("kernel_size", kernel_size, minimum=1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size!r} must be an odd integer >= 1")
        check_choice("pooling", pooling, POOLINGS)
        self.budget, self.observation_window = budget, observation_window
        self.kernel_size, self.pooling = kernel_size, pooling
        super().__init__(config, per_head, bits, group_size, residual_length, rotate)

    def full_attention_layer(self, layer: LayerGeometry, storage: Storage) -> SnapKVLayer:
        return SnapKVLayer(
            layer, self.budget, self.observation_window, self.kernel_size, self.pooling, storage, self.per_head
        )


register_cache("snapkv", SnapKVCache, "SnapKV: compress each prompt by observation-window attention (score capture)")
