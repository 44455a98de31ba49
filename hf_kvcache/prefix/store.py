"""`PrefixCache`: restore the longest stored prefix of a prompt into a cache, and save new blocks."""

import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from hf_kvcache.caches.base import KVCache
from hf_kvcache.caches.evicting import EvictionCache
from hf_kvcache.devices import layer_devices
from hf_kvcache.geometry import layers_without_per_token_kv, model_geometry
from hf_kvcache.prefix.backend import Backend, BackendError
from hf_kvcache.prefix.codec import (
    BlockFormat,
    BlockKV,
    BlockShape,
    CorruptBlock,
    Unauthenticated,
    decode_block,
    decode_tensors,
    encode_block,
    encode_tensors,
)
from hf_kvcache.prefix.keys import block_keys, cache_signature, model_fingerprint
from hf_kvcache.prefix.stats import LevelStats
from hf_kvcache.prefix.tiered import TieredBackend, known_total
from hf_kvcache.prefix.transform_codec import TransformCodec
from hf_kvcache.validation import check_int

logger = logging.getLogger(__name__)

COMPRESSED_KIND = "compressed cache"  # the format of entries holding a compressed context's held tensors
SECRET_VARIABLE = "HF_KVCACHE_STORE_SECRET"  # the environment variable a store's secret is read from

# Why a block looked up was not served: not stored, an entry that must not be served (corrupt, unauthenticated,
# not this model's), or the backend failing. A lookup's misses after the first missing block count under its cause.
MISS_CAUSES = ("absent", "unusable", "unavailable")
_COUNTERS = (
    "lookups",
    "recomputed",
    "hits",
    "misses",
    *(f"misses_{cause}" for cause in MISS_CAUSES),
    "tokens_reused",
    "blocks_saved",
    "bytes_stored",
    "errors",
    "unauthenticated",
)


def store_secret(secret: str | bytes | None) -> bytes | None:
    """The secret as bytes: `secret`, else the `HF_KVCACHE_STORE_SECRET` environment variable, else None.

    Raises:
        ValueError: an empty secret, or one that is not a string or bytes.
    """
    if secret is None:
        secret = os.environ.get(SECRET_VARIABLE) or None
        if secret is None:
            return None
    if not isinstance(secret, str | bytes) or not secret:  # the value itself is not echoed: it is a secret
        length = len(secret) if isinstance(secret, str | bytes) else "-"
        raise ValueError(
            f"secret=<a {type(secret).__name__} of length {length}> is not accepted; accepted: a non-empty str or "
            f"bytes, or None to read ${SECRET_VARIABLE}"
        )
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def block_shape(model: PreTrainedModel) -> BlockShape:
    """The geometry and dtype every block restored into `model` must have: its layers that cache KV."""
    return BlockShape(model_geometry(model.config).cached_kv_sizes, model.dtype)


def prompt_tokens(input_ids: torch.Tensor | Sequence[int]) -> list[int]:
    """One prompt's token ids as a list: a 1-D sequence or a `(1, length)` tensor."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(
            f"input_ids of shape {tuple(ids.shape)}: the prefix store takes one prompt, "
            "shaped (length,) or (1, length); run a batch one prompt at a time"
        )
    return ids.tolist()


class PrefixCache:
    """A store of prompt KV in blocks of `block_size` tokens, keyed by a chain hash and the model.

    Args:
        backend: where blocks live: `MemoryBackend`, `DiskBackend`, `RedisBackend` or a `TieredBackend`
            of them.
        block_size: tokens per block; only whole blocks are stored and restored.
        bits: None stores blocks in the model's precision (restores are exact); 2, 3, 4 or 8 store
            `QuantizedCache`'s KIVI codes with their statistics (4 bits: 0.28x of fp16 bytes), restored
            dequantized (lossy: outputs after a hit may differ from a cold run's).
        group_size: with `bits`: tokens per key block and, at most, channels per value group (None: 64).
        codec: instead of `bits`, a `TransformCodec` (decorrelated, bit-allocated, zstd-compressed blocks, calibrated
            for one model: saving or restoring for another raises a ValueError); restores are lossy like `bits`.
        prefetch_blocks: blocks per backend request while restoring; the next request runs in a background
            thread while the blocks just received are checked and decoded, so a long prefix's transfer
            overlaps its decoding. 0 fetches the whole prefix in one request.
        secret: a key (str or bytes) that signs every entry with an HMAC-SHA256 and derives the store's keys
            and fingerprints, so that only holders of the secret can write entries this store serves, or
            compute which key holds which prompt. None reads `$HF_KVCACHE_STORE_SECRET`; unset, entries carry
            a plain checksum, which detects damage but not forgery (see the README on sharing a store).

    Blocks are keyed by the model, the cache's class and settings, and the format: a block is never
    restored into another configuration. Models with layers that hold more than per-token attention KV
    (hybrids' linear-attention / Mamba / convolution states, sparse attention's indexer keys) are served
    by recomputing: nothing is restored or saved for them (a warning says so once per store), since a
    restore of KV alone would leave those layers without the prefix's state.

    Every entry read back is untrusted: besides its identity and checksum (or MAC), a block must have the
    restoring model's geometry (layers, KV heads, head sizes), dtype and finite values, and be no larger than
    that geometry allows; a compressed context must fit the cache and the context it is restored for.
    Anything else is a miss, and the entry is deleted.

    Counters (see `stats()`): `lookups` prompts looked up, `recomputed` of those for models the store cannot
    serve (see above); `hits` and `misses` blocks of those prompts found or not (of the whole blocks a lookup
    could use), the misses also by cause (`misses_absent`, `misses_unusable`, `misses_unavailable`: not
    stored, an entry that must not be served, the backend failing); `tokens_reused`; `blocks_saved` and
    `bytes_stored` written by this object; `errors` corrupt entries and backend failures (each a
    miss with a logged warning, never an exception); `unauthenticated` of those errors, entries without a
    valid MAC under the secret (warned about once per store).

    Raises:
        ValueError: a backend that is not a prefix backend, or a parameter out of range (named).
    """

    def __init__(
        self,
        backend: Backend,
        block_size: int = 256,
        bits: int | None = None,
        group_size: int | None = None,
        prefetch_blocks: int = 4,
        secret: str | bytes | None = None,
        codec: TransformCodec | None = None,
    ):
        if not isinstance(backend, Backend):
            raise ValueError(
                f"backend={backend!r} must be a prefix backend: MemoryBackend, DiskBackend, RedisBackend "
                "or TieredBackend"
            )
        check_int("block_size", block_size, minimum=1)
        check_int("prefetch_blocks", prefetch_blocks, hint="0 fetches a prefix in one request")
        self.backend = backend
        self.block_size = block_size
        if codec is not None and not isinstance(codec, TransformCodec):
            raise ValueError(
                f"codec: a {type(codec).__name__} is not accepted; give a TransformCodec, e.g. "
                "TransformCodec(CodecCalibration.load(path), model), or None"
            )
        if codec is not None and group_size is not None:
            raise ValueError(f"group_size={group_size} applies to `bits` blocks; a codec's blocks have no groups")
        self.block_format = BlockFormat(bits, 64 if group_size is None else group_size, codec)
        self.prefetch_blocks = prefetch_blocks
        self._secret = store_secret(secret)
        self.backend_stats = LevelStats(backend)
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._lock = threading.Lock()
        self._prefetcher: ThreadPoolExecutor | None = None
        self._warned_unreusable: set[str] = set()
        self._warned_unauthenticated = False

    @property
    def authenticated(self) -> bool:
        """Whether entries are signed and checked with a secret."""
        return self._secret is not None

    def _reusable(self, model: PreTrainedModel) -> bool:
        """Whether restored KV alone reproduces the prefix for this model (see the class docstring)."""
        kinds = layers_without_per_token_kv(model.config)
        if kinds and model.config.model_type not in self._warned_unreusable:
            self._warned_unreusable.add(model.config.model_type)
            logger.warning(
                "prefix store: %s has %s layers, whose state after a prefix is not per-token KV; its prompts are "
                "recomputed, nothing is restored or saved",
                model.config.model_type,
                ", ".join(kinds),
            )
        return not kinds

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._counts[name] += amount

    def _get(self, keys: list[str], parent: str | None, max_bytes: int) -> list[bytes] | BackendError:
        """The backend's values for the longest present prefix of `keys` (none larger than `max_bytes`: a larger
        one ends the prefix, unread), or the error it raised."""
        try:
            values = self.backend_stats.timed_fetch(keys, parent, max_bytes)
        except BackendError as error:
            return error
        return values

    def _requests(self, keys: list[str], max_bytes: int) -> Iterator[tuple[list[str], list[bytes] | BackendError]]:
        """`(keys, values)` per request of `prefetch_blocks` keys; the next request is already running while
        the caller decodes the current one, and none is sent once a request comes back short."""
        if not self.prefetch_blocks or len(keys) <= self.prefetch_blocks:
            yield keys, self._get(keys, None, max_bytes)
            return
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="hf_kvcache-prefetch")
        chunks = [keys[i : i + self.prefetch_blocks] for i in range(0, len(keys), self.prefetch_blocks)]
        pending: Future = self._prefetcher.submit(self._get, chunks[0], None, max_bytes)
        for index, chunk in enumerate(chunks):
            values = pending.result()
            complete = not isinstance(values, BackendError) and len(values) == len(chunk)
            if complete and index + 1 < len(chunks):
                pending = self._prefetcher.submit(self._get, chunks[index + 1], chunk[-1], max_bytes)
            yield chunk, values
            if not complete:
                return

    def _fetch(self, keys: list[str], fingerprint: str, shape: BlockShape) -> tuple[list[BlockKV], str]:
        """Decoded blocks for the longest run of valid entries at the start of `keys`, and the cause (one of
        `MISS_CAUSES`) of the misses after it."""
        blocks: list[BlockKV] = []
        max_bytes = shape.max_bytes(self.block_size)
        for chunk, values in self._requests(keys, max_bytes):
            if isinstance(values, BackendError):
                self._unavailable("recomputing", values, "read")
                return blocks, "unavailable"
            self._available("read")
            for key, data in zip(chunk, values):
                try:
                    if len(data) > max_bytes:
                        raise CorruptBlock(f"{len(data)} bytes, more than a block of this model can take ({max_bytes})")
                    position = len(blocks) * self.block_size
                    block = decode_block(
                        data, key, fingerprint, self.block_size, self.block_format, self._secret, shape, position
                    )
                except CorruptBlock as error:
                    self._unusable(key, error)
                    return blocks, "unusable"
                blocks.append(block)
            if len(values) < len(chunk):
                break
        return blocks, "absent"

    def _unusable(self, key: str, error: CorruptBlock) -> None:
        """Count, log and delete an entry that must not be served."""
        unauthenticated = isinstance(error, Unauthenticated)
        self._count(errors=1, unauthenticated=int(unauthenticated))
        if not unauthenticated:
            logger.warning("prefix store entry %s… is unusable (%s); recomputing it", key[:16], error)
        elif not self._warned_unauthenticated:
            self._warned_unauthenticated = True
            logger.warning(
                "prefix store entry %s… has no valid MAC under this store's secret: written without the secret "
                "or altered; it and any like it are recomputed and deleted (counted in stats()['unauthenticated'])",
                key[:16],
            )
        self._drop(key)

    def _digest(self, identity: str) -> str:
        """sha256 of `identity`, keyed by the secret when the store has one (so keys cannot be computed)."""
        if self._secret is None:
            return hashlib.sha256(identity.encode()).hexdigest()
        return hmac.new(self._secret, identity.encode(), hashlib.sha256).hexdigest()

    def fingerprint(self, model: PreTrainedModel, cache: Cache | None) -> str:
        """The model's fingerprint combined with the cache's signature and the block format: KV computed after a
        restore through a quantizing or evicting cache differs from full-precision KV, and a block is read
        in the format it was written in, so each configuration has its own keys."""
        if self.block_format.codec is not None:
            self.block_format.codec.check_model(model)
        identity = f"{model_fingerprint(model)}:{cache_signature(cache)}:{self.block_format.describe()}"
        return self._digest(identity)

    def _drop(self, key: str) -> None:
        try:
            self.backend.delete(key)
        except BackendError as error:
            logger.warning("could not delete prefix store entry %s…: %s", key[:16], error)

    def _unavailable(self, consequence: str, error: BackendError, operation: str) -> None:
        """Count a backend failure of `operation` ("read" or "write"); warn once per outage (the next success of
        every failing operation logs the recovery, once)."""
        self._count(errors=1)
        if self.backend_stats.went_down(operation):
            logger.warning("prefix store unavailable, %s until it is back: %s", consequence, error)

    def _available(self, operation: str) -> None:
        if self.backend_stats.came_back(operation):
            logger.warning("prefix store is reachable again: %r", self.backend)

    @torch.no_grad()
    def restore(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor | Sequence[int],
        cache: Cache,
        max_tokens: int | None = None,
    ) -> int:
        """Feed the KV of the longest stored prefix (whole blocks, at most `max_tokens` tokens) into `cache`.

        `cache` must be empty; the restored KV goes through its `update`, exactly as a prefill would
        (so a quantizing cache quantizes it). Returns the number of tokens restored (0 on a miss).
        """
        if cache.get_seq_length() != 0:
            raise ValueError("cache must be empty: restore() fills a fresh cache")
        tokens = prompt_tokens(input_ids)
        usable = len(tokens) if max_tokens is None else max(0, min(len(tokens), max_tokens))
        reusable = self._reusable(model)
        if not reusable:
            usable = 0
        fingerprint = self.fingerprint(model, cache)
        keys = block_keys(fingerprint, tokens[:usable], self.block_size)
        blocks, cause = self._fetch(keys, fingerprint, block_shape(model)) if keys else ([], "absent")
        feed = cache.load if isinstance(cache, KVCache) else cache.update  # score caches await no scores for it
        devices = layer_devices(model) if blocks else []
        for layer in range(len(blocks[0]) if blocks else 0):
            keys_states = torch.cat([block[layer][0] for block in blocks], dim=-2)
            value_states = torch.cat([block[layer][1] for block in blocks], dim=-2)
            feed(keys_states[None].to(devices[layer]), value_states[None].to(devices[layer]), layer)
        restored, missed = len(blocks) * self.block_size, len(keys) - len(blocks)
        self._count(lookups=1, recomputed=int(not reusable), hits=len(blocks), misses=missed, tokens_reused=restored)
        self._count(**{f"misses_{cause}": missed})
        return restored

    def save(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor | Sequence[int],
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        start: int = 0,
        cache: Cache | None = None,
    ) -> int:
        """Store every complete block of the prompt covered by `layers`; returns the blocks written.

        `layers[i]` holds layer i's keys and values, shaped `(1, kv_heads, tokens, head_dim)`, for the
        prompt's tokens `start, start + 1, ...`: the same count in every layer, and on a model with sliding or
        chunked layers every token from `start` (else a ValueError). `start` must be a multiple of `block_size`.
        `cache`: the cache the model ran with while computing them (None: one that keeps every token exactly);
        blocks are only ever restored into a cache of the same class and settings.
        """
        if start % self.block_size:
            raise ValueError(f"start={start} must be a multiple of block_size={self.block_size}")
        if any(t.shape[0] != 1 for pair in layers for t in pair):
            raise ValueError("layers must hold one prompt (batch size 1)")
        tokens = prompt_tokens(input_ids)
        self._check_every_token_held(model, layers, len(tokens) - start)
        if not self._reusable(model):
            return 0
        covered = min(len(tokens), start + min((k.shape[-2] for k, _ in layers), default=0))
        fingerprint = self.fingerprint(model, cache)
        keys = block_keys(fingerprint, tokens[:covered], self.block_size)
        saved = 0
        for index in range(start // self.block_size, len(keys)):
            begin, end = index * self.block_size - start, (index + 1) * self.block_size - start
            block = [(k[0, :, begin:end], v[0, :, begin:end]) for k, v in layers]
            position = index * self.block_size
            data = encode_block(keys[index], fingerprint, block, self.block_format, self._secret, position)
            try:
                stored = self.backend.put(keys[index], data, keys[index - 1] if index else None)
            except BackendError as error:
                self._unavailable("blocks not saved", error, "write")
                break
            self._available("write")
            if not stored:  # larger than the backend's whole budget
                break
            saved += 1
            self._count(blocks_saved=1, bytes_stored=len(data))
        return saved

    @staticmethod
    def _check_every_token_held(model: PreTrainedModel, layers: list, prompt_tokens_from_start: int) -> None:
        """Refuse KV that a layer's window has cut: its newest tokens would be stored as the first ones. Every
        layer must hold the same count, and a model with windowed layers all of the prompt's tokens from start."""
        lengths = sorted({tensor.shape[-2] for pair in layers for tensor in pair})
        windowed = any(layer.is_windowed for layer in model_geometry(model.config).layers)
        if len(lengths) > 1 or (windowed and lengths and lengths[0] < prompt_tokens_from_start):
            raise ValueError(
                f"layers hold {lengths[0]} to {lengths[-1]} tokens of the prompt's {prompt_tokens_from_start} from "
                "start: every layer must hold the same tokens from start (all of them on a model with sliding or "
                "chunked layers). A sliding-window layer of DynamicCache(config=...) keeps only its window; take "
                "the KV from DynamicCache() (no config: every layer keeps every token) or use "
                "generate_with_prefix_cache"
            )

    def _compressed_key(
        self, model: PreTrainedModel, tokens: list[int], cache: EvictionCache, tokenizer: object
    ) -> tuple[str, str]:
        """(key, fingerprint) of a compressed context: the model, the cache's class and storage, the policy (and
        a compress-once policy's prompt ids), and every token of the context, in the prefix store's chain hash.
        Only settings count, not the cache's other attributes (which change as it runs)."""
        cache_identity = f"{type(cache).__module__}.{type(cache).__qualname__}:{cache.storage!r}"
        compression = cache.compression_identity(model, tokenizer)
        identity = f"{model_fingerprint(model)}:{COMPRESSED_KIND}:{cache_identity}:{compression}"
        fingerprint = self._digest(identity)
        return block_keys(fingerprint, tokens, len(tokens))[0], fingerprint

    def save_compressed(
        self,
        model: PreTrainedModel,
        context_ids: torch.Tensor | Sequence[int],
        cache: EvictionCache,
        tokenizer: object = None,
    ) -> bool:
        """Store what `cache` holds after `cache.compress_context(model, context_ids, tokenizer=tokenizer)`
        (one context, unpadded): every layer's stores, padding record, positions and policy state, exactly.

        Returns False when the backend did not keep it (unreachable, or larger than its whole budget).

        Raises:
            ValueError: not an `EvictionCache`, a batch, or a cache whose seen length is not the context's.
        """
        tokens = self._compressed_tokens(context_ids, cache)
        if cache.get_seq_length() != len(tokens):
            raise ValueError(
                f"the cache has seen {cache.get_seq_length()} tokens, the context has {len(tokens)}: save the cache "
                "right after compress_context, before any question"
            )
        key, fingerprint = self._compressed_key(model, tokens, cache, tokenizer)
        data = encode_tensors(key, fingerprint, COMPRESSED_KIND, cache.held_state(), self._secret)
        try:
            stored = self.backend.put(key, data)
        except BackendError as error:
            self._unavailable("compressed contexts not saved", error, "write")
            return False
        self._available("write")
        if stored:
            self._count(blocks_saved=1, bytes_stored=len(data))
        return stored

    def restore_compressed(
        self,
        model: PreTrainedModel,
        context_ids: torch.Tensor | Sequence[int],
        cache: EvictionCache,
        tokenizer: object = None,
    ) -> bool:
        """Fill the empty `cache` with the compressed context `save_compressed` stored for the same model, cache
        class, storage, policy (and reconstruction prompt) and context tokens; exactly as saved. Returns False
        on a miss (any other configuration never restores); corrupt entries and backend failures are misses
        (logged, counted in `errors`).

        Raises:
            ValueError: not an `EvictionCache`, a batch, or a cache that is not empty.
        """
        tokens = self._compressed_tokens(context_ids, cache)
        if cache.get_seq_length() != 0:
            raise ValueError("cache must be empty: restore_compressed() fills a fresh cache")
        key, fingerprint = self._compressed_key(model, tokens, cache, tokenizer)
        found = self._get([key], None, block_shape(model).max_bytes(len(tokens)))
        cause = "absent"
        if isinstance(found, BackendError):
            self._unavailable("recomputing", found, "read")
            found, cause = [], "unavailable"
        else:
            self._available("read")
        hit = False
        if found:
            try:
                tensors = decode_tensors(found[0], key, fingerprint, COMPRESSED_KIND, self._secret)
                cache.load_held_state(tensors, layer_devices(model)[0], seen_tokens=len(tokens), dtype=model.dtype)
                hit = True
            except CorruptBlock as error:
                self._unusable(key, error)
                cause = "unusable"
            except ValueError as error:  # load_held_state refused it: it does not fit this cache and context
                self._unusable(key, CorruptBlock(str(error)))
                cause = "unusable"
        self._count(lookups=1, hits=int(hit), misses=int(not hit), tokens_reused=len(tokens) if hit else 0)
        self._count(**{f"misses_{cause}": int(not hit)})
        return hit

    @staticmethod
    def _compressed_tokens(context_ids: torch.Tensor | Sequence[int], cache: object) -> list[int]:
        if not isinstance(cache, EvictionCache):
            raise ValueError(f"cache={cache!r} must be an EvictionCache (compressed contexts are held by one)")
        return prompt_tokens(context_ids)

    def _counters(self) -> dict:
        """The counters and the hit rate (hits / blocks looked up)."""
        with self._lock:
            counts: dict = dict(self._counts)
        looked_up = counts["hits"] + counts["misses"]
        counts["hit_rate"] = counts["hits"] / looked_up if looked_up else 0.0
        return counts

    def stats(self) -> dict:
        """Counters since creation, the hit rate (hits / blocks looked up), the backend's outages (times it
        started failing) and whether it is `down` now, its bytes and evictions,
        fetch latency in milliseconds (`fetch_ms_mean`, `_p50`, `_p95`, `_p99`, per backend request), and for a
        `TieredBackend` a `tiers` list with the same figures per level, fastest first (the totals are summed
        from it, so each level is asked for its bytes once)."""
        counts = self._counters()
        tiers = self.backend.tier_stats() if isinstance(self.backend, TieredBackend) else None
        backend = self.backend_stats.summary(include_backend=tiers is None)
        counts |= {name: value for name, value in backend.items() if name.startswith("fetch_ms")}
        counts |= {"outages": backend["outages"], "down": backend["down"]}
        if tiers is None:
            counts |= {name: backend[name] for name in ("bytes_held", "evictions")}
        else:
            counts |= {name: known_total(tier[name] for tier in tiers) for name in ("bytes_held", "evictions")}
            counts["tiers"] = tiers
        return counts

    def __repr__(self) -> str:
        """The counters and latency; not the bytes held (that may scan a whole Redis namespace: see `stats()`)."""
        s = self._counters()
        mean = self.backend_stats.summary(include_backend=False)["fetch_ms_mean"]
        latency = f", fetch {mean:.2f} ms mean" if mean is not None else ""
        return (
            f"PrefixCache({self.backend!r}, block_size={self.block_size}, {self.block_format.describe()}: "
            f"{s['lookups']} lookups, hit rate {s['hit_rate']:.1%} ({s['hits']} hits, {s['misses']} misses), "
            f"{s['tokens_reused']} tokens reused, {s['blocks_saved']} blocks / {s['bytes_stored']} bytes stored, "
            f"{s['errors']} errors{latency})"
        )
