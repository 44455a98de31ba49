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

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import ClassVar

import torch
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from hf_kvcache.caches.base import FULL_PRECISION, KVCache, KVLayer, Storage
from hf_kvcache.caches.storage import TensorMap
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.policies.base import STORAGE_SETTINGS, EvictionPolicy, Needs, Step
from hf_kvcache.policies.h2o import H2O
from hf_kvcache.policies.kvzip import RECONSTRUCTION_SCORES
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
    tracks_padding = False  # `real`, per head, replaces the per-row record of KVLayer

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
        if self.reconstructing:
            self.observe_reconstruction(call)
            return
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
        step = self._step(self.query_length, attention, queries, call.scaling)
        policy.update_state(step)
        if evict:
            self.keep(policy.select(step, self.budget))

    def _step(
        self,
        query_length: int,
        attention: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
        scaling: float | None = None,
    ) -> Step:
        """The policy's view of what this layer holds after a forward of `query_length` tokens."""
        return Step(
            self.geometry,
            self.num_layers,
            query_length,
            self.seen_tokens,
            self.real,
            self.positions,
            self.state,
            self.running,
            self.body.read,
            attention,
            queries,
            scaling,
        )

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

    # --- compress once (KVzip): score reconstructions of the held context, then keep the best --------
    reconstructing = False  # set by `EvictionCache.scoring_reconstructions` around reconstruction forwards

    def observe_reconstruction(self, call: AttentionCall) -> None:
        """Instead of `observe` during a reconstruction forward: raise each held token's recorded score
        (`state`, [batch, kv_heads, held]) to the highest attention this forward's queries gave it
        (`policy.reconstruction_scores`); evict nothing. `forget_newest` then drops the forward's tokens."""
        held = self.stored_tokens - self.query_length
        received = self.policy.reconstruction_scores(call, held, self.geometry.kv_heads)
        previous = self.state.get(RECONSTRUCTION_SCORES)
        self.state[RECONSTRUCTION_SCORES] = received if previous is None else torch.maximum(previous, received)

    def forget_newest(self, count: int) -> None:
        """Drop the newest `count` tokens as if never seen (the tokens of a reconstruction forward)."""
        self.body.drop_newest(count)
        self.real, self.positions = self.real[..., :-count], self.positions[..., :-count]
        self.seen_tokens -= count

    def keep_reconstructed(self) -> None:
        """Keep what the policy selects by the recorded reconstruction scores (all tokens when they fit the
        budget), then drop the scores."""
        if self.stored_tokens > self.budget:
            self.keep(self.policy.select(self._step(query_length=0), self.budget))
        self.state.pop(RECONSTRUCTION_SCORES, None)

    # --- bookkeeping ------------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int, **kwargs) -> None:
        refuse_rollback(self)

    def activate_past_recording(self, **kwargs) -> None:
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
        self.policy.check_layer(layer)
        layer_type = PolicyLayer
        if self.policy.ragged:
            from hf_kvcache.caches.ragged import RaggedPolicyLayer  # it builds on PolicyLayer

            layer_type = RaggedPolicyLayer
        return layer_type(layer, storage, self.policy, self.policy.layer_budget(layer.index, num_layers), num_layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.policy!r}, {self.storage!r})"

    # --- compress once, reuse ---------------------------------------------------------------------
    def compress_context(
        self,
        model: PreTrainedModel,
        context_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        """Fill this empty cache with the context `context_ids` [batch, length] (left padding: 0 in
        `attention_mask`), compressed once; then `clone()` it for each question, fed from position `length`.

        A compress-once policy (`policy.compress_once`, KVzip) compresses the context its own way (see
        `KVzip.compress_context`; `tokenizer` tokenizes its reconstruction prompt). Any other policy gets the
        context as one prompt forward, evicting as it does after any prompt; `tokenizer` is then unused.
        Positions count each row's real tokens from 0, as `generate` does.

        Raises:
            ValueError: a non-empty cache; for compress-once policies, see their `compress_context`.
        """
        if getattr(self.policy, "compress_once", False):
            self.policy.compress_context(self, model, context_ids, attention_mask, tokenizer)
            return
        if self.get_seq_length() != 0:
            raise ValueError("compress_context fills an empty cache: call cache.reset() or build a new one")
        positions = None
        if attention_mask is not None:
            positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        with torch.no_grad():
            model(
                context_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{CACHE_KWARG: self},
            )

    def clone(self) -> "EvictionCache":
        """An independent copy (every held tensor copied; config and policy shared): one per question, so that
        a compressed context serves many. `copy.deepcopy(cache)` works too, but copies the config."""
        return copy.deepcopy(self, {id(self._checked_config): self._checked_config, id(self.policy): self.policy})

    @contextlib.contextmanager
    def scoring_reconstructions(self) -> Iterator[None]:
        """Within: forwards are reconstructions, to be undone with `forget_newest` after each. Policy layers
        score them (`PolicyLayer.observe_reconstruction`) instead of evicting; other layers (the model's own
        sliding windows) defer their eviction, so that `forget_newest` can roll them back."""
        policy_layers = [layer for layer in self.layers if isinstance(layer, PolicyLayer)]
        windows = [layer for layer in self.layers if isinstance(layer, KVLayer) and not isinstance(layer, PolicyLayer)]
        for layer in policy_layers:
            layer.reconstructing = True
        for layer in windows:
            layer.activate_past_recording()
        try:
            yield
        finally:
            for layer in policy_layers:
                layer.reconstructing = False
            for layer in windows:
                layer.record_past = False

    def forget_newest(self, count: int) -> None:
        """Drop every layer's newest `count` tokens (those of the last reconstruction forward)."""
        for layer in self.layers:
            if isinstance(layer, PolicyLayer):
                layer.forget_newest(count)
            elif isinstance(layer, KVLayer):
                layer.crop(-count)

    def keep_reconstructed(self) -> None:
        """Every policy layer keeps what its policy selects by the reconstruction scores it recorded."""
        for layer in self.layers:
            if isinstance(layer, PolicyLayer):
                layer.keep_reconstructed()

    # --- the held tokens as tensors (the prefix store saves and restores compressed contexts) -------
    def compression_identity(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        """What besides the model, the storage and the context determines what this cache holds after
        `compress_context`: the policy and, for compress-once policies, their reconstruction prompt's ids."""
        if getattr(self.policy, "compress_once", False):
            return f"{self.policy!r}:prompt_ids={self.policy.prompt_ids(model, tokenizer)}"
        return repr(self.policy)

    def held_state(self) -> dict[str, torch.Tensor]:
        """Every held tensor by name `<layer>.<part>`: the seen count, head and body stores (`KVStore.state`) with
        their padding records, and for policy layers the per-head padding record, positions and policy state;
        `load_held_state` takes it back."""
        tensors: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            if not isinstance(layer, KVLayer) or not layer.is_initialized:
                continue
            parts = {"seen": torch.tensor([layer.seen_tokens])}
            parts |= {f"head.{name}": t for name, t in layer.head.state().items()}
            parts |= {f"body.{name}": t for name, t in layer.body.state().items()}
            parts |= {name: t for name in ("head_real", "body_real") if (t := getattr(layer, name)) is not None}
            if isinstance(layer, PolicyLayer):
                parts |= {"real": layer.real, "positions": layer.positions}
                parts |= {f"state.{name}": t for name, t in layer.state.items()}
                parts |= {f"running.{name}": t for name, t in layer.running.items()}
            tensors |= {f"{index}.{name}": t for name, t in parts.items()}
        return tensors

    def load_held_state(self, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Hold exactly what `held_state` of a cache with the same config, policy and storage returned, on
        `device`. Raises ValueError unless this cache is empty."""
        if self.get_seq_length() != 0:
            raise ValueError("load_held_state fills an empty cache: call cache.reset() or build a new one")
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            index, _, part = name.partition(".")
            by_layer.setdefault(int(index), {})[part] = tensor.to(device)
        for index, parts in sorted(by_layer.items()):
            layer = self.layers[index]
            head = _named(parts, "head")
            layer.head, layer.body = (
                FULL_PRECISION.store_from_state(head),
                layer.storage.store_from_state(_named(parts, "body")),
            )
            layer.dtype, layer.device = head["keys"].dtype, head["keys"].device
            layer.seen_tokens, layer.is_initialized = int(parts["seen"]), True
            layer.head_real, layer.body_real = parts.get("head_real"), parts.get("body_real")
            if isinstance(layer, PolicyLayer):
                layer.real, layer.positions = parts["real"], parts["positions"]
                layer.state, layer.running = _named(parts, "state"), _named(parts, "running")


def _named(parts: dict[str, torch.Tensor], group: str) -> dict[str, torch.Tensor]:
    """The tensors named `<group>.<name>` in `parts`, by `<name>`."""
    return {name.removeprefix(group + "."): t for name, t in parts.items() if name.startswith(group + ".")}


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
