"""Shared machinery of score-based eviction caches (H2O, TOVA, SnapKV).

A `ScoredLayer` is a `KVLayer` whose tokens are evicted by attention scores. Scores arrive after
`update` (the attention of the current forward must first use every key): `update` announces the
layer to the capturing attention function (`hf_kvcache.scoring`), which calls `queries_needed` and
then `observe(scores)`; `observe` evicts. A policy only says which queries it needs and which tokens
it keeps (`select`).

GQA and layout: scores are averaged over the query heads that share a KV head. With `per_head=True`
each KV head keeps its own token set (a per-head gather along the token dimension); with
`per_head=False` the scores are averaged over all heads of the layer and every head keeps the same
tokens (the TOVA paper's choice). Either way every head keeps the same *number* of tokens, so the
cache stays one dense tensor per layer, costs the same bytes, and shares the mask arithmetic:
`kv_length = stored + query`, `kv_offset = seen - stored`. Kept tokens keep the rotary positions they
were computed with (no re-rotation); since every stored token precedes the new queries, the causal
mask lets the queries attend all of them.

Quantized storage (`bits`) quantizes keys and values per token (`TokenQuantizedStore`, rotated
by default, the newest `residual_length` tokens in full precision): KIVI's per-channel key blocks
would lose their statistics when single tokens leave them, per head.
"""

import torch
from transformers import PreTrainedConfig

from hf_kvcache.caches.base import FULL_PRECISION, KVCache, KVLayer, Storage
from hf_kvcache.caches.storage import TensorMap
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.scoring import announce_update
from hf_kvcache.validation import check_bool, check_int


def check_budget(budget: int, **others: int) -> None:
    """`budget` must be an int >= 1 and every other value an int in [0, budget]."""
    check_int("budget", budget, minimum=1)
    for name, value in others.items():
        check_int(name, value, 0, budget, maximum_name=f"budget={budget}")


def refuse_rollback(layer: object) -> None:
    raise ValueError(
        f"{type(layer).__name__} cannot roll back (crop), so it cannot serve assisted or prompt-lookup decoding: "
        "score-based eviction keeps no record of the tokens it evicted, and which tokens it keeps depends on "
        "the tokens a rollback would remove. Use QuantizedCache, SlidingWindowCache or SinkCache for assisted decoding."
    )


class ScoredLayer(KVLayer):
    """A layer that keeps at most `budget` tokens per KV head, chosen by attention scores."""

    is_croppable = False

    def __init__(self, geometry: LayerGeometry, budget: int, storage: Storage = FULL_PRECISION, per_head: bool = True):
        super().__init__(geometry, storage)
        self.budget, self.per_head = budget, per_head
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
        """Receive float32 [batch, attention KV heads, stored] scores (or None when none were asked) and evict.

        Attention may see more KV heads than the cache holds (latent MLA caches hold one shared latent):
        scores are then averaged over the attention heads that share a cached head."""
        if scores is not None:
            heads = 1 if not self.per_head else self.geometry.kv_heads
            scores = scores.unflatten(1, (heads, -1)).mean(dim=2)
        keep = self.select(scores)
        if keep is not None:
            self.keep(keep.sort(dim=-1).values)

    def select(self, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Token indices [batch, heads, kept] to keep (heads: KV heads, or 1 shared by all of them), or
        None to keep everything. `scores` is [batch, heads, stored]."""
        raise NotImplementedError

    def keep(self, indices: torch.Tensor) -> None:
        """Keep, per batch row and KV head, the stored tokens at `indices` (ascending)."""
        self.body.gather(indices)

    # --- bookkeeping ------------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        refuse_rollback(self)

    def activate_past_recording(self) -> None:
        refuse_rollback(self)

    def _map_batch(self, fn: TensorMap) -> None:
        super()._map_batch(fn)
        self.map_state(fn)

    def map_state(self, fn: TensorMap) -> None:
        """Apply a batch operation to per-token policy state (e.g. accumulated scores)."""

    def reset(self) -> None:
        super().reset()
        self.query_length = 0


class ScoredCache(KVCache):
    """A `KVCache` whose full-attention layers are `ScoredLayer`s. Needs `enable_score_capture(model)`.

    Subclasses pass on `per_head` and the storage settings, which every score-based cache accepts:
    `bits` None (full precision) or 2/3/4/8 (per-token quantization, see the module docstring), with
    `group_size`, `residual_length` and `rotate` as in `QuantizedCache`.
    """

    needs_score_capture = True  # tools that build caches from specs enable capture on the model for these

    def __init__(
        self,
        config: PreTrainedConfig,
        per_head: bool,
        bits: int | None,
        group_size: int | None,
        residual_length: int,
        rotate: bool,
    ):
        check_bool("per_head", per_head)
        self.per_head = per_head
        super().__init__(config, Storage(bits, group_size, residual_length, rotate, token_wise=True))
