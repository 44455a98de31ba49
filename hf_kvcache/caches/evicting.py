"""The generic eviction cache: `(config, policy, storage)`, one `PolicyLayer` (`caches/policy_layer.py`: the one
eviction hook, padding) per full-attention layer, `RaggedPolicyLayer` for ragged policies (Ada-KV).

Every head keeps the same number of tokens unless the policy is `ragged` (Ada-KV), so the kept tokens
stay one dense tensor per layer; kept tokens keep the rotary positions they were computed with.
"""

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Iterator
from typing import ClassVar

import torch
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from hf_kvcache.caches import compress_once
from hf_kvcache.caches.base import FULL_PRECISION, KVCache, KVLayer, Storage
from hf_kvcache.caches.policy_layer import PolicyLayer
from hf_kvcache.caches.ragged import RaggedPolicyLayer
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.policies.base import STORAGE_SETTINGS, EvictionPolicy, on_policy_registered
from hf_kvcache.policies.h2o import H2O
from hf_kvcache.policies.snapkv import SnapKV
from hf_kvcache.policies.tova import TOVA
from hf_kvcache.registry import fields_as_parameters, register_cache, registered_caches


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
        layer_type = RaggedPolicyLayer if self.policy.ragged else PolicyLayer
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

        A compress-once policy (`policies.base.CompressOncePolicy`, KVzip) is fed by its protocol (see
        `hf_kvcache.caches.compress_once.compress_context`; `tokenizer` tokenizes its scoring prompt). Any
        other policy gets the context as one prompt forward, evicting as it does after any prompt; `tokenizer`
        is then unused.
        Positions count each row's real tokens from 0, as `generate` does.

        Raises:
            ValueError: a non-empty cache; for compress-once policies, see their `compress_context`.
        """
        if self.compresses_once:
            compress_once.compress_context(self, model, context_ids, attention_mask, tokenizer)
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

    @property
    def compresses_once(self) -> bool:
        """Whether the policy compresses a context once (then feed contexts through `compress_context`)."""
        return compress_once.compresses_once(self)

    def over_budget(self) -> bool:
        """Whether some policy layer holds more tokens than its budget."""
        return any(layer.stored_tokens > layer.budget for layer in self.layers if isinstance(layer, PolicyLayer))

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
        if self.compresses_once:
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

    def load_held_state(
        self,
        tensors: dict[str, torch.Tensor],
        device: torch.device | str = "cpu",
        seen_tokens: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Hold exactly what `held_state` of a cache with the same config, policy and storage returned, on
        `device`.

        The tensors may come from a shared store, so all of them are checked before anything is held: one
        entry per KV layer of this cache and only the parts such a layer holds; keys and values of the
        layer's geometry (KV heads, key and value channels), floating point (`dtype`, when given) and
        finite; one batch size; a seen count at least the tokens held (equal to `seen_tokens`, when given)
        and at most what the layer holds between forwards (`get_max_length`); positions in [0, seen); padding
        records of the stores' sizes.

        Raises:
            ValueError: this cache is not empty, or the tensors do not fit it (the message says what).
        """
        if self.get_seq_length() != 0:
            raise ValueError("load_held_state fills an empty cache: call cache.reset() or build a new one")
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            index, _, part = name.partition(".")
            if not index.isdecimal() or not isinstance(tensor, torch.Tensor):
                raise ValueError(f"held state entry {name!r} is not named <layer>.<part> or is not a tensor")
            by_layer.setdefault(int(index), {})[part] = tensor.to(device)
        expected = [index for index, layer in enumerate(self.layers) if isinstance(layer, KVLayer)]
        if sorted(by_layer) != expected:
            raise ValueError(
                f"held state holds layers {sorted(by_layer)[:8]}, this cache's KV layers are {expected[:8]}"
            )
        checked = {
            index: _checked_layer(self.layers[index], parts, seen_tokens, dtype) for index, parts in by_layer.items()
        }
        if len({held["batch"] for held in checked.values()}) > 1:
            raise ValueError("held state layers have different batch sizes")
        for index, held in checked.items():
            layer = self.layers[index]
            layer.head, layer.body = held["head"], held["body"]
            layer.dtype, layer.device = layer.head.keys.dtype, layer.head.keys.device
            layer.seen_tokens, layer.is_initialized = held["seen"], True
            layer.head_real, layer.body_real = held["head_real"], held["body_real"]
            if isinstance(layer, PolicyLayer):
                layer.real, layer.positions = held["real"], held["positions"]
                layer.state, layer.running = held["state"], held["running"]


def _checked_layer(
    layer: KVLayer, parts: dict[str, torch.Tensor], seen_tokens: int | None, dtype: torch.dtype | None
) -> dict:
    """What `load_held_state` sets on `layer` from its `parts`, after checking them all (ValueError naming the
    layer and the part otherwise)."""
    where = layer.geometry.describe()
    policy = isinstance(layer, PolicyLayer)
    allowed = {"seen", "head_real", "body_real", *(("real", "positions") if policy else ())}
    head_names = {f"head.{name}" for name in FULL_PRECISION.store_type.tensor_names}
    body_names = {f"body.{name}" for name in layer.storage.store_type.tensor_names}
    groups = ("state.", "running.") if policy else ()
    unknown = [name for name in sorted(set(parts) - allowed - head_names - body_names) if not name.startswith(groups)]
    missing = sorted({"seen", *head_names, *body_names, *(("real", "positions") if policy else ())} - set(parts))
    if unknown or missing:
        raise ValueError(f"{where}: held state has unexpected parts {unknown} or lacks {missing}")
    try:
        head, body = (
            FULL_PRECISION.store_from_state(_named(parts, "head")),
            layer.storage.store_from_state(_named(parts, "body")),
        )
        reads = [head.read(), body.read()]
    except Exception as error:  # forged codes or statistics that do not fit together
        raise ValueError(f"{where}: held stores cannot be read back: {error}") from None
    geometry = layer.geometry
    batch = head.keys.shape[0]
    for store, (keys, values) in zip(("head", "body"), reads):
        for name, tensor, channels in (("keys", keys, geometry.key_dim), ("values", values, geometry.value_dim)):
            shape = (batch, geometry.kv_heads, tensor.shape[-2], channels)
            if tensor.dim() != 4 or tuple(tensor.shape) != shape or not tensor.is_floating_point():
                raise ValueError(f"{where}: held {store} {name} are {tensor.dtype} {tuple(tensor.shape)}, not {shape}")
            if dtype is not None and tensor.dtype != dtype:
                raise ValueError(f"{where}: held {store} {name} are {tensor.dtype}, the model's are {dtype}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{where}: held {store} {name} hold values that are not finite")
    stored = len(head) + len(body)
    seen = parts["seen"]
    if seen.shape != (1,) or seen.is_floating_point() or seen.dtype == torch.bool:
        raise ValueError(f"{where}: the seen count is {seen.dtype} {tuple(seen.shape)}, not one integer")
    seen = int(seen)
    if seen < stored or (seen_tokens is not None and seen != seen_tokens):
        raise ValueError(f"{where}: seen count {seen} for {stored} tokens held, a context of {seen_tokens}")
    held = {"head": head, "body": body, "seen": seen, "batch": batch}
    for name, store in (("head_real", head), ("body_real", body)):
        record = parts.get(name)
        if record is not None and (
            record.dtype != torch.bool or tuple(record.shape) not in {(batch, len(store)), (1, len(store))}
        ):
            raise ValueError(f"{where}: padding record {name} is {record.dtype} {tuple(record.shape)}")
        held[name] = record
    if policy:
        per_token = (batch, geometry.kv_heads, stored)
        real, positions = parts["real"], parts["positions"]
        if real.dtype != torch.bool or tuple(real.shape) != per_token:
            raise ValueError(
                f"{where}: the real-token record is {real.dtype} {tuple(real.shape)}, not bool {per_token}"
            )
        if positions.dtype != torch.int32 or tuple(positions.shape) != per_token:
            raise ValueError(
                f"{where}: positions are {positions.dtype} {tuple(positions.shape)}, not int32 {per_token}"
            )
        if positions.numel() and not (int(positions.min()) >= 0 and int(positions.max()) < seen):
            raise ValueError(f"{where}: positions outside [0, {seen})")
        if stored > layer.get_max_length():
            raise ValueError(f"{where}: {stored} tokens held, more than the {layer.get_max_length()} it can hold")
        held |= {"real": real, "positions": positions}
        for group in ("state", "running"):
            named = _named(parts, group)
            for name, tensor in named.items():
                if (
                    tensor.dim() == 0
                    or tensor.shape[0] not in (batch, 1)
                    or (group == "state" and tensor.shape[-1] != stored)
                ):
                    raise ValueError(f"{where}: policy {group} {name!r} is shaped {tuple(tensor.shape)}")
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise ValueError(f"{where}: policy {group} {name!r} holds values that are not finite")
            held[group] = named
    return held


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


def _policy_cache(policy_type: type[EvictionPolicy], config: PreTrainedConfig, **settings: object) -> EvictionCache:
    return EvictionCache(config, *policy_and_storage(policy_type, settings))


def _register_policy_spec(name: str, help: str, policy_type: type[EvictionPolicy]) -> None:
    """Make a policy recorded by `register_policy` the cache spec `name` (refusing a name another cache holds)."""
    existing = registered_caches().get(name)
    registered = getattr(getattr(existing, "factory", None), "args", (None,))[0]
    if existing is not None and getattr(registered, "__qualname__", None) != policy_type.__qualname__:
        raise ValueError(
            f"cache name {name!r} is already registered ({existing.help}); choose another name for "
            f"{policy_type.__name__}"
        )
    parameters = {**fields_as_parameters(policy_type), **fields_as_parameters(Storage, list(STORAGE_SETTINGS))}
    register_cache(name, functools.partial(_policy_cache, policy_type), help, parameters)


on_policy_registered(_register_policy_spec)


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
