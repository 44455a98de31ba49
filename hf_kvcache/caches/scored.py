"""Shared machinery of score-based eviction caches (H2O, TOVA, SnapKV).

A `ScoredLayer` is a `KVLayer` whose tokens are evicted by attention scores. Scores arrive after
`update` (the attention of the current forward must first use every key): `update` announces the
layer to the capturing attention function (`hf_kvcache.scoring`), which calls `queries_needed` and
then `observe(scores)`; `observe` evicts. A policy only says which queries it needs and which tokens
it keeps (`select`).

GQA and layout: scores are averaged over the query heads that share a KV head, and each KV head keeps
its own token set (a per-head `torch.gather` along the token dimension of the full-precision store).
Every head keeps the same *number* of tokens, so the cache stays one dense tensor per layer and the
mask arithmetic is shared: `kv_length = stored + query`, `kv_offset = seen - stored`. Kept tokens keep
the rotary positions they were computed with (no re-rotation); since every stored token precedes the
new queries, the causal mask lets the queries attend all of them.

Quantized storage (`bits`) is refused: KIVI quantizes keys per channel over blocks of consecutive
tokens, and per-head removal of arbitrary tokens breaks those blocks.
"""

import torch
from transformers import PreTrainedConfig

from hf_kvcache.caches.base import KVCache, KVLayer, Storage
from hf_kvcache.caches.storage import TensorMap
from hf_kvcache.scoring import announce_update


def check_budget(budget: int, **others: int) -> None:
    """`budget` must be an int >= 1 and every other value an int in [0, budget]."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"budget={budget!r} must be an integer >= 1 (tokens kept per layer and KV head)")
    for name, value in others.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= budget:
            raise ValueError(f"{name}={value!r} must be an integer between 0 and budget={budget}")


class ScoredLayer(KVLayer):
    """A full-precision layer that keeps at most `budget` tokens per KV head, chosen by attention scores."""

    is_croppable = False

    def __init__(self, budget: int):
        super().__init__(Storage())
        self.budget = budget
        self.query_length = 0  # tokens added by the latest update

    def get_max_length(self) -> int:
        return self.budget

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.query_length = key_states.shape[-2]
        announce_update(self)
        return keys, values

    # --- called by the capturing attention, after this forward's attention ------------------------
    def queries_needed(self, query_length: int) -> int:
        """How many of this forward's last queries to score (0: no scores needed)."""
        raise NotImplementedError

    def observe(self, scores: torch.Tensor | None) -> None:
        """Receive float32 [batch, kv_heads, stored] scores (or None when none were asked) and evict."""
        keep = self.select(scores)
        if keep is not None:
            self.keep(keep.sort(dim=-1).values)

    def select(self, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Token indices [batch, kv_heads, kept] to keep, or None to keep everything."""
        raise NotImplementedError

    def keep(self, indices: torch.Tensor) -> None:
        """Keep, per batch row and KV head, the stored tokens at `indices` (ascending)."""
        index = indices[..., None].expand(-1, -1, -1, self.body.keys.shape[-1])
        self.body.keys = self.body.keys.gather(2, index)
        self.body.values = self.body.values.gather(2, index)

    # --- bookkeeping ------------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot crop: score-based eviction keeps no record of evicted tokens. "
            "Use a cache without eviction for assisted decoding."
        )

    def _map_batch(self, fn: TensorMap) -> None:
        super()._map_batch(fn)
        self.map_state(fn)

    def map_state(self, fn: TensorMap) -> None:
        """Apply a batch operation to per-token policy state (e.g. accumulated scores)."""

    def reset(self) -> None:
        super().reset()
        self.query_length = 0


class ScoredCache(KVCache):
    """A `KVCache` whose full-attention layers are `ScoredLayer`s. Needs `enable_score_capture(model)`."""

    needs_score_capture = True  # tools that build caches from specs enable capture on the model for these

    def __init__(self, config: PreTrainedConfig, bits: int | None = None):
        if bits is not None:
            raise ValueError(
                f"bits={bits!r} is not supported by {type(self).__name__}: accepted value None (full precision). "
                "Score-based eviction removes arbitrary tokens per KV head, which breaks the per-channel key "
                "blocks of the quantized (KIVI) storage."
            )
        super().__init__(config, Storage())
