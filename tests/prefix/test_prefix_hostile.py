"""Hostile store entries: someone who can write to the backend (but holds no secret) plants entries.

With a secret every planted entry is a miss (never served, never an exception); without one the geometry,
dtype and finiteness checks still make every entry that does not fit the model a miss, while a well-formed
forgery is served: the reason the README asks for a secret on a shared store.
"""

import logging

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids
from safetensors.torch import save
from transformers import DynamicCache

from hf_kvcache import EvictionCache, enable_score_capture
from hf_kvcache.policies import KVzip
from hf_kvcache.prefix import DiskBackend, MemoryBackend, PrefixCache, RedisBackend, generate_with_prefix_cache
from hf_kvcache.prefix.codec import BlockFormat, _checksum, block_metadata, encode_tensors
from hf_kvcache.prefix.keys import block_keys
from hf_kvcache.prefix.store import COMPRESSED_KIND, SECRET_VARIABLE, store_secret

GREEDY = {"max_new_tokens": 4, "do_sample": False}
BLOCK = 8
FULL = BlockFormat()
# Refused before the MAC is checked: a size over the geometry's, or an entry signed for another key.
CAUGHT_BEFORE_THE_MAC = ("oversized", "replayed-other-key")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def make_backend(kind: str, tmp_path, request):
    if kind == "memory":
        return MemoryBackend()
    if kind == "disk":
        return DiskBackend(tmp_path / "store")
    backend = RedisBackend(request.getfixturevalue("redis_server").url)
    backend.clear()
    return backend


def kv(model, heads=None, tokens=BLOCK, head_dim=None, dtype=torch.float32, fill=None):
    """A random block's layers, shaped like `model`'s unless told otherwise."""
    config = model.config
    heads = heads or config.num_key_value_heads
    head_dim = head_dim or config.hidden_size // config.num_attention_heads
    layers = []
    for _ in range(config.num_hidden_layers):
        keys, values = torch.randn(heads, tokens, head_dim), torch.randn(heads, tokens, head_dim)
        if fill is not None:
            keys[0, 0, 0] = fill
        layers.append((keys.to(dtype), values.to(dtype)))
    return layers


def forged(key: str, fingerprint: str, layers, format_label: str | None = None, block_format=FULL) -> bytes:
    """A block as the attacker writes it: any tensors, the identity read from the victim's header, and the
    plain checksum recomputed (the scheme is public). `format_label` lies about the format."""
    tensors = {}
    for index, (keys, values) in enumerate(layers):
        state = block_format.pack(keys[None], values[None])
        tensors |= {f"{index}.{name}": tensor.contiguous() for name, tensor in state.items()}
    meta = {"layout": "hf_kvcache.prefix/3", "key": key, "fingerprint": fingerprint, "layers": str(len(layers))}
    meta |= {"tokens": str(layers[0][0].shape[-2]), "format": format_label or block_format.describe()}
    return save(tensors, metadata={**meta, "sha256": _checksum(meta, tensors)})


# Each attack: (the victim's key, its stored bytes, the model) -> planted bytes, and whether the entry fits
# the model (then only a secret can tell it from the victim's own).
ATTACKS = {
    "another-prompts-kv": (lambda key, fp, data, m: forged(key, fp, kv(m)), True),
    "scaled-keys": (lambda key, fp, data, m: forged(key, fp, [(k * 100, v) for k, v in kv(m)]), True),
    "replayed-other-key": (lambda key, fp, data, m: data, False),  # filled in by the test: another key's bytes
    "nan-kv": (lambda key, fp, data, m: forged(key, fp, kv(m, fill=float("nan"))), False),
    "inf-kv": (lambda key, fp, data, m: forged(key, fp, kv(m, fill=float("inf"))), False),
    "int64-tensors": (
        lambda key, fp, data, m: forged(key, fp, [(k.long(), v.long()) for k, v in kv(m)]),
        False,
    ),
    "float16-kv": (lambda key, fp, data, m: forged(key, fp, kv(m, dtype=torch.float16)), False),
    "wrong-kv-heads": (lambda key, fp, data, m: forged(key, fp, kv(m, heads=1)), False),
    "wrong-head-size": (lambda key, fp, data, m: forged(key, fp, kv(m, head_dim=8)), False),
    "one-layer-missing": (lambda key, fp, data, m: forged(key, fp, kv(m)[:1]), False),
    "extra-layer": (lambda key, fp, data, m: forged(key, fp, kv(m) * 2), False),
    "foreign-4-bit-codes": (
        lambda key, fp, data, m: forged(key, fp, kv(m), BlockFormat().describe(), BlockFormat(4, group_size=8)),
        False,
    ),
    "oversized": (lambda key, fp, data, m: data + b"\0" * (64 << 20), False),
}


@pytest.mark.parametrize("secret", [None, "s3cret"], ids=["no-secret", "secret"])
@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("kind", ["memory", "disk", "redis"])
def test_planted_blocks(model, kind, attack, secret, tmp_path, request, caplog, monkeypatch):
    monkeypatch.delenv(SECRET_VARIABLE, raising=False)
    store = PrefixCache(make_backend(kind, tmp_path, request), block_size=BLOCK, secret=secret)
    victim, other = random_ids(model, 1, 3 * BLOCK + 1, seed=0), random_ids(model, 1, 3 * BLOCK + 1, seed=1)
    reference = model.generate(victim, **GREEDY)
    generate_with_prefix_cache(model, victim, store, **GREEDY)
    generate_with_prefix_cache(model, other, store, **GREEDY)
    fingerprint = store.fingerprint(model, None)
    victim_keys = block_keys(fingerprint, victim[0].tolist(), BLOCK)
    (first,) = store.backend.get_prefix(victim_keys[:1])
    header_fingerprint = block_metadata(first)["fingerprint"]
    make, fits = ATTACKS[attack]
    if attack == "replayed-other-key":
        planted = store.backend.get_prefix(block_keys(fingerprint, other[0].tolist(), BLOCK)[:1])[0]
    else:
        planted = make(victim_keys[0], header_fingerprint, first, model)
    store.backend.put(victim_keys[0], planted)

    with caplog.at_level(logging.WARNING, logger="hf_kvcache"):
        output = generate_with_prefix_cache(model, victim, store, **GREEDY)  # never an exception
    served = store.stats()["tokens_reused"] > 0
    assert served == (fits and secret is None), store.stats()
    if not served:
        assert torch.equal(output, reference)  # recomputed: the victim's own output
        # The backend refuses an oversized entry unread (it deletes and logs it): a plain miss to the store.
        assert store.stats()["errors"] == (attack != "oversized") and len(caplog.records) == 1
        assert store.stats()["unauthenticated"] == (secret is not None and attack not in CAUGHT_BEFORE_THE_MAC)
        assert store.backend.get_prefix(victim_keys[:1])[0] != planted  # deleted, then rewritten
    if secret is not None:  # keys and header fingerprints are keyed: not the plain ones an attacker computes
        plain = PrefixCache(MemoryBackend(), block_size=BLOCK).fingerprint(model, None)
        assert fingerprint != plain and header_fingerprint != plain


def held_entry(model, store, ids, policy):
    cache = EvictionCache(model.config, policy)
    cache.compress_context(model, ids, tokenizer=None)
    assert store.save_compressed(model, ids, cache)
    key, fingerprint = store._compressed_key(model, ids[0].tolist(), cache, None)
    return cache, key, fingerprint


def edit_held(change):
    def attack(held: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        held = {name: tensor.clone() for name, tensor in held.items()}
        change(held)
        return held

    return attack


HELD_ATTACKS = {
    "seen-10**9": edit_held(lambda held: held.__setitem__("0.seen", torch.tensor([10**9]))),
    "nan-keys": edit_held(lambda held: held["0.body.keys"].view(-1)[0].fill_(float("nan"))),
    "missing-positions": edit_held(lambda held: held.pop("1.positions")),
    "positions-out-of-range": edit_held(lambda held: held["0.positions"].fill_(10**6)),
    "wrong-head-size": edit_held(lambda held: held.__setitem__("0.body.keys", held["0.body.keys"][..., :8])),
    "over-the-budget": edit_held(
        lambda held: [
            held.__setitem__(name, torch.cat([held[name]] * 3, dim=-1 if name.endswith(("real", "positions")) else -2))
            for name in ("0.body.keys", "0.body.values", "0.real", "0.positions")
        ]
    ),
    "layer-missing": edit_held(lambda held: [held.pop(name) for name in list(held) if name.startswith("1.")]),
    "unknown-part": edit_held(lambda held: held.__setitem__("0.extra", torch.zeros(1))),
    "float16-kv": edit_held(
        lambda held: [held.__setitem__(name, held[name].half()) for name in list(held) if name.endswith("keys")]
    ),
}


@pytest.mark.parametrize("secret", [None, "s3cret"], ids=["no-secret", "secret"])
@pytest.mark.parametrize("attack", list(HELD_ATTACKS))
def test_planted_compressed_contexts(attack, secret, caplog, monkeypatch):
    monkeypatch.delenv(SECRET_VARIABLE, raising=False)
    model = enable_score_capture(make_tiny_model("llama"))
    store = PrefixCache(MemoryBackend(), secret=secret)
    ids = random_ids(model, 1, 40)
    policy = KVzip(budget=12, chunk_size=16, prompt="")
    original, key, fingerprint = held_entry(model, store, ids, policy)
    planted = HELD_ATTACKS[attack](original.held_state())
    store.backend.put(key, encode_tensors(key, fingerprint, COMPRESSED_KIND, planted))  # plain checksum

    empty = EvictionCache(model.config, policy)
    with caplog.at_level(logging.WARNING, logger="hf_kvcache"):
        assert not store.restore_compressed(model, ids, empty)  # a miss, not an exception
    assert not empty.layers[0].is_initialized and empty.get_seq_length() == 0  # nothing half-loaded
    assert store.stats()["errors"] == 1 and store.stats()["unauthenticated"] == (secret is not None)
    assert store.backend.get_prefix([key]) == []  # deleted


def test_a_secret_is_read_from_the_environment_and_checked(monkeypatch):
    monkeypatch.setenv(SECRET_VARIABLE, "from-env")
    assert PrefixCache(MemoryBackend()).authenticated and store_secret(None) == b"from-env"
    monkeypatch.setenv(SECRET_VARIABLE, "")
    assert not PrefixCache(MemoryBackend()).authenticated
    for bad in ("", b"", 42):
        with pytest.raises(ValueError, match="accepted: a non-empty str or bytes") as refused:
            PrefixCache(MemoryBackend(), secret=bad)
        assert "42" not in str(refused.value)  # the value of a secret is never echoed


def test_entries_signed_under_one_secret_are_misses_under_another(model, monkeypatch):
    monkeypatch.delenv(SECRET_VARIABLE, raising=False)
    backend, ids = MemoryBackend(), random_ids(model, 1, 3 * BLOCK + 1)
    generate_with_prefix_cache(model, ids, PrefixCache(backend, block_size=BLOCK, secret="a"), **GREEDY)
    for secret, restored in (("a", 3 * BLOCK), ("b", 0), (None, 0)):
        store = PrefixCache(backend, block_size=BLOCK, secret=secret)
        assert store.restore(model, ids, DynamicCache(config=model.config)) == restored
