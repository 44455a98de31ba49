"""The generic eviction cache: `(config, policy, storage)`, one `PolicyLayer` per full-attention layer.

One eviction hook: a policy layer evicts after its forward's attention ran, when the capturing attention
function (`hf_kvcache.scoring`, switched on by `enable_score_capture(model)`) hands it the attention
call. The layer announces itself in `update`; the attention function first asks it for the mask
(`attention_mask`: the padding of kept tokens, which transformers cannot know once tokens were evicted
out of order), runs the model's own attention, then calls `observe`, which builds the policy's `Step`
and keeps what the policy selects. Every policy goes through this hook, whether it reads attention
(H2O, SnapKV) or only keys (Knorm), so padding is handled once, for all of them.

Left-padded batches: each row keeps its own tokens; padding is never kept in place of a real token
(only as filler when a row has fewer real tokens than the budget) and never attended.

Every head keeps the same number of tokens unless the policy is `ragged` (Ada-KV), so the kept tokens
stay one dense tensor per layer; kept tokens keep the rotary positions they were computed with.
"""

import dataclasses
from typing import ClassVar

import torch
from transformers import PreTrainedConfig

from hf_kvcache.caches.base import FULL_PRECISION, KVCache, KVLayer, Storage
from hf_kvcache.caches.storage import TensorMap
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.policies.base import STORAGE_SETTINGS, EvictionPolicy, Needs, Step
from hf_kvcache.policies.h2o import H2O
from hf_kvcache.policies.snapkv import SnapKV
from hf_kvcache.policies.tova import TOVA
from hf_kvcache.scoring import AttentionCall, announce_update, padding_of_new_tokens, with_stored_padding


def refuse_rollback(layer: object) -> None:
    raise ValueError(
        f"{type(layer).__name__} cannot roll back (crop), so it cannot serve assisted or prompt-lookup decoding: "
        "policy-based eviction keeps no record of the tokens it evicted, and which tokens it keeps depends on "
        "the tokens a rollback would remove. Use QuantizedCache, SlidingWindowCache or SinkCache for assisted decoding."
    )


def gather_last(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`tensor[b, h, indices[b, h, i]]` for [batch, heads, tokens] tensors; either side may have one head."""
    heads = max(tensor.shape[1], indices.shape[1])
    return tensor.expand(-1, heads, -1).gather(2, indices.expand(-1, heads, -1))


class PolicyLayer(KVLayer):
    """A full-attention layer whose kept tokens are chosen by `policy`, at most `budget` per KV head.

    Besides the stored keys and values it holds, per stored token and KV head, whether the token is real
    (bool) and the position it was seen at (int32); both count in `memory_bytes`.
    """

    is_croppable = False

    def __init__(self, geometry: LayerGeometry, storage: Storage, policy: EvictionPolicy, budget: int, num_layers: int):
        super().__init__(geometry, storage)
        self.policy, self.budget, self.num_layers = policy, budget, num_layers
        self.query_length = 0
        self.real: torch.Tensor | None = None  # bool [batch, kv_heads, stored]
        self.positions: torch.Tensor | None = None  # int32 [batch, kv_heads, stored]
        self.state: dict[str, torch.Tensor] = {}  # the policy's per-token state, [batch, heads or 1, stored]
        self.running: dict[str, torch.Tensor] = {}  # the policy's other state, batch first

    def get_max_length(self) -> int:
        return self.budget

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.query_length = key_states.shape[-2]
        announce_update(self)
        return keys, values

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super()._append(key_states, value_states)
        batch, heads, count = key_states.shape[:3]
        new_positions = torch.arange(self.seen_tokens - count, self.seen_tokens, device=key_states.device)
        new_positions = new_positions.to(torch.int32).expand(batch, heads, -1)
        new_real = torch.ones((batch, heads, count), dtype=torch.bool, device=key_states.device)
        if self.real is None:
            self.real, self.positions = new_real, new_positions.clone()
        else:
            self.real = torch.cat([self.real, new_real], dim=-1)
            self.positions = torch.cat([self.positions, new_positions], dim=-1)

    # --- called by the capturing attention function -----------------------------------------------
    def attention_mask(self, attention_mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
        """Record which of this forward's tokens are padding; return the mask with the true padding of
        the stored tokens (see `scoring.with_stored_padding`)."""
        new_real = padding_of_new_tokens(attention_mask, self.query_length)
        if new_real is not None:
            self.real[..., -self.query_length :] = new_real[:, None]
        return with_stored_padding(attention_mask, self.real[..., : -self.query_length], query)

    def observe(self, call: AttentionCall) -> None:
        """Build the policy's `Step` from this forward's attention call, update its state, and evict."""
        policy, stored = self.policy, self.stored_tokens
        evict = policy.should_evict(self.query_length, stored, self.budget)
        attention = queries = None
        count = min(policy.scored_queries(self.query_length), self.query_length)
        if policy.needs is Needs.LAST_QUERIES and not evict:
            count = 0
        if count and policy.needs in (Needs.LAST_QUERIES, Needs.EVERY_QUERY):
            attention = self._per_cached_head(call.scores(count))
        elif count and policy.needs is Needs.QUERY_STATES:
            queries = call.query[:, :, -count:]
        step = Step(
            self.geometry,
            self.num_layers,
            self.query_length,
            self.seen_tokens,
            self.real,
            self.positions,
            self.state,
            self.running,
            lambda: self.body.read()[0],
            attention,
            queries,
        )
        policy.update_state(step)
        if evict:
            self.keep(policy.select(step, self.budget))

    def _per_cached_head(self, scores: torch.Tensor) -> torch.Tensor:
        """Average attention over the attention heads that share a cached head (latent MLA caches hold one
        shared latent for many attention KV heads), or over all heads when the policy is not per head."""
        heads = self.geometry.kv_heads if self.policy.per_head else 1
        return scores.unflatten(1, (heads, -1)).mean(dim=2)

    def keep(self, indices: torch.Tensor) -> None:
        """Keep, per batch row and KV head (or for all heads: [batch, 1, kept]), the tokens at `indices`."""
        self.body.gather(indices)
        self.real, self.positions = gather_last(self.real, indices), gather_last(self.positions, indices)
        self.state.update({name: gather_last(value, indices) for name, value in self.state.items()})

    def kept_positions(self) -> list[list[list[int]]]:
        """Per batch row and KV head, the positions of the real tokens held (ascending)."""
        if not self.is_initialized:
            return []
        return [
            [positions[real].tolist() for positions, real in zip(row_positions, row_real)]
            for row_positions, row_real in zip(self.positions, self.real)
        ]

    def padding_held(self) -> int:
        """Padding tokens held (as filler, masked) over all rows and heads."""
        return int((~self.real).sum()) if self.is_initialized else 0

    # --- bookkeeping ------------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        refuse_rollback(self)

    def activate_past_recording(self) -> None:
        refuse_rollback(self)

    def _map_batch(self, fn: TensorMap) -> None:
        super()._map_batch(fn)
        if self.real is not None:
            self.real, self.positions = fn(self.real), fn(self.positions)
        self.state.update({name: fn(value) for name, value in self.state.items()})
        self.running.update({name: fn(value) for name, value in self.running.items()})

    def reset(self) -> None:
        super().reset()
        self.query_length = 0
        self.real = self.positions = None
        self.state, self.running = {}, {}

    def memory_bytes(self) -> int:
        held = (self.real, self.positions, *self.state.values(), *self.running.values())
        bookkeeping = sum(t.nbytes for t in held if t is not None)
        return super().memory_bytes() + bookkeeping


class EvictionCache(KVCache):
    """A drop-in `Cache` that keeps, in every full-attention layer, the tokens `policy` selects, held as
    `storage` says. Needs `hf_kvcache.enable_score_capture(model)` (the one eviction hook).

    Args:
        config: the model config (decoder LM).
        policy: an `EvictionPolicy` value, e.g. `H2O(budget=256)`, `Knorm(budget=128)`.
        storage: how kept tokens are held: `Storage()` (full precision) or `Storage(bits=2|3|4|8,
            token_wise=True)` (each token quantized on its own, so single tokens can leave any head).

    Raises:
        ValueError: a storage that cannot keep the tokens the policy selects (KIVI's per-channel key blocks
            cannot lose single tokens per head), a layer kind no cache can hold, naming the layer.

    Layers the model runs with its own sliding window keep that window (in `storage`), as in every
    hf_kvcache cache. Assisted decoding is refused (`is_croppable` is False): eviction cannot be undone.
    """

    needs_score_capture = True  # tools that build caches from specs enable capture on the model for these

    def __init__(self, config: PreTrainedConfig, policy: EvictionPolicy, storage: Storage = FULL_PRECISION):
        if not isinstance(policy, EvictionPolicy):
            raise ValueError(f"policy={policy!r} must be an EvictionPolicy value, e.g. H2O(budget=256)")
        if not isinstance(storage, Storage):
            raise ValueError(f"storage={storage!r} must be a Storage value, e.g. Storage(bits=4, token_wise=True)")
        if not storage.keeps_any_tokens:
            raise ValueError(
                f"storage={storage!r} cannot keep the tokens {type(policy).__name__} selects: its keys are quantized "
                "per channel over blocks of tokens (KIVI), whose statistics would be lost when single tokens leave "
                "one head. Pass token_wise=True (each token quantized on its own) or bits=None."
            )
        self.policy = policy
        super().__init__(config, storage)

    def full_attention_layer(self, layer: LayerGeometry, storage: Storage) -> PolicyLayer:
        num_layers = self.geometry.num_layers
        layer_type = PolicyLayer
        if self.policy.ragged:
            from hf_kvcache.caches.ragged import RaggedPolicyLayer  # it builds on PolicyLayer

            layer_type = RaggedPolicyLayer
        return layer_type(layer, storage, self.policy, self.policy.layer_budget(layer.index, num_layers), num_layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.policy!r}, {self.storage!r})"


def policy_and_storage(
    policy_type: type[EvictionPolicy], settings: dict[str, object]
) -> tuple[EvictionPolicy, Storage]:
    """Split keyword settings into the policy's fields and the storage's (kept tokens quantized per token)."""
    policy_fields = [field.name for field in dataclasses.fields(policy_type)]
    unknown = [name for name in settings if name not in policy_fields and name not in STORAGE_SETTINGS]
    if unknown:
        raise ValueError(
            f"{policy_type.__name__} has no parameter {unknown[0]!r}; accepted parameters: "
            f"{', '.join([*policy_fields, *STORAGE_SETTINGS])}"
        )
    policy = policy_type(**{name: value for name, value in settings.items() if name in policy_fields})
    storage = Storage(**{name: value for name, value in settings.items() if name in STORAGE_SETTINGS}, token_wise=True)
    return policy, storage


class PolicyCache(EvictionCache):
    """A named preset: `Preset(config, budget, **settings)` = `EvictionCache(config, policy_type(budget, ...),
    Storage(..., token_wise=True))`, the settings being the policy's fields and the storage's `bits`,
    `group_size`, `residual_length`, `rotate`."""

    policy_type: ClassVar[type[EvictionPolicy]]

    def __init__(self, config: PreTrainedConfig, budget: int = EvictionPolicy.budget, **settings: object):
        super().__init__(config, *policy_and_storage(self.policy_type, {"budget": budget, **settings}))


class HeavyHitterCache(PolicyCache):
    """H2O as a drop-in cache: see `hf_kvcache.policies.H2O` for the settings (plus the storage's)."""

    policy_type = H2O


class TOVACache(PolicyCache):
    """TOVA as a drop-in cache: see `hf_kvcache.policies.TOVA` for the settings (plus the storage's)."""

    policy_type = TOVA


class SnapKVCache(PolicyCache):
    """SnapKV as a drop-in cache: see `hf_kvcache.policies.SnapKV` for the settings (plus the storage's)."""

    policy_type = SnapKV
