"""A per-layer bit profile from a short calibration: each layer's sensitivity to quantized keys and values.

For every layer l, every width b of `choices` and each half (keys, values), one chunked pass over the
calibration text measures how much the model's predictions degrade when only layer l's keys (or only its
values) are held at b bits, everything else in full precision. Two measures come from each pass:

- "kl" (default): the mean over predicted tokens of KL(full-precision next-token distribution ||
  quantized one), in nats. This is the NLL increase expected when the next tokens follow the model itself:
  it is never negative and it is free of the first-order, text-dependent term that dominates a measured
  ΔNLL for a small change. On the packaged SmolLM2-135M over 512 tokens of pg19, one layer's ΔNLL is mostly
  noise (within ±4e-3 nats, 23 of the 60 2-bit entries negative) and profiles chosen from it lose to uniform
  widths on WikiText-2 (2.5 bits: ppl 16.11 vs 15.52 for keys 3 / values 2), while KL is positive and
  falls with the width in every layer, and its profiles win (2.5 bits: 15.42; 3 bits: 15.32 vs 15.37;
  DynamicCache 15.23; benchmarks/bit_profile.py).
- "nll": ΔNLL, the mean NLL increase over the text's own next tokens (the evaluation's metric).

Assuming the measures add up, `choose_bits` then picks every layer's (key bits, value bits) with the least
summed measure whose mean over layers of (key + value) / 2 stays within the budget: the exact optimum of
that model (a multiple-choice knapsack). Cost: layers x 2 x len(choices) passes over the text (SmolLM2-135M,
30 layers, choices 2/3/4: 180 passes; about 2 s each for 512 tokens on one CPU core) and the
full-precision log-probabilities of the text held in memory (tokens x vocabulary x 4 bytes).

Source: KVTuner (Li et al. 2025, https://arxiv.org/abs/2502.04420), which searches layer-wise key and
value precision pairs offline from measured sensitivity; here the search is the exact knapsack on
one-layer measures (additivity assumed) instead of KVTuner's multi-objective search over grouped layers.
"""

import dataclasses
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel

from hf_kvcache.caches.base import FULL_PRECISION, KVLayer, Storage
from hf_kvcache.caches.quantized import QuantizedCache
from hf_kvcache.caches.storage import FullPrecisionStore, KVStore, TensorMap
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.devices import input_device
from hf_kvcache.geometry import SHARED_KIND, LayerGeometry, model_geometry
from hf_kvcache.quant.profile import METRICS, BitProfile, check_budget, check_choices, choose_bits
from hf_kvcache.validation import check_choice, check_int

HALVES = ("keys", "values")
# QuantizedCache parameters that are not calibration settings: the widths (chosen here) and how attention
# reads the codes (which does not change what is stored).
NOT_SETTINGS = ("config", "bits", "key_bits", "profile", "attention", "compile_attention")


def calibration_settings(**settings: object) -> dict[str, object]:
    """Every `QuantizedCache` storage setting (group sizes, residual length, sinks, rotation, ...): its default,
    or the value in `settings`; a ValueError names a setting `QuantizedCache` does not have or that is not a
    calibration setting (the widths, the attention mode)."""
    parameters = inspect.signature(QuantizedCache).parameters
    accepted = {name: p.default for name, p in parameters.items() if name not in NOT_SETTINGS}
    for name in settings:
        if name not in accepted:
            raise ValueError(
                f"{name!r} is not a QuantizedCache setting a profile is calibrated with; accepted settings: "
                f"{', '.join(accepted)}"
            )
    return {**accepted, **settings}


class HalfQuantizedStore(KVStore):
    """Calibration only: one half (keys or values) read back from a quantized store, the other half from a
    full-precision copy of the same tokens. Both stores receive every token, so the quantized half goes
    through exactly the blocks, residual and rotation it would in a `QuantizedCache`."""

    def __init__(self, quantized: KVStore, exact: FullPrecisionStore, quantized_half: str):
        self.quantized, self.exact, self.quantized_half = quantized, exact, quantized_half

    def __len__(self) -> int:
        return len(self.exact)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.quantized.append(keys, values)
        self.exact.append(keys, values)

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        keys, values = self.quantized.read()
        if self.quantized_half == "keys":
            return [(keys, self.exact.values)]
        return [(self.exact.keys, values)]

    def drop_oldest(self, count: int) -> None:
        self.quantized.drop_oldest(count)
        self.exact.drop_oldest(count)

    def drop_newest(self, count: int) -> None:
        self.quantized.drop_newest(count)
        self.exact.drop_newest(count)

    def map_batch(self, fn: TensorMap) -> None:
        self.quantized.map_batch(fn)
        self.exact.map_batch(fn)

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError("a calibration store is not saved")

    def nbytes(self) -> int:
        return self.quantized.nbytes() + self.exact.nbytes()


@dataclass(frozen=True)
class HalfQuantizedStorage(Storage):
    """A `Storage` whose stores quantize only `quantized_half` ("keys" or "values"); calibration only."""

    quantized_half: str = "keys"

    def new_store(self, keys: torch.Tensor, values: torch.Tensor) -> KVStore:
        return HalfQuantizedStore(
            super().new_store(keys, values), FullPrecisionStore(keys, values), self.quantized_half
        )


class OneLayerQuantizedCache(QuantizedCache):
    """Calibration only: layer `layer`'s keys or values (`half`) at `bits` bits, everything else in full
    precision (the other half of that layer, every other layer)."""

    def __init__(self, config: PreTrainedConfig, layer: int, half: str, bits: int, **settings: object):
        self.target_layer, self.quantized_half = layer, half
        super().__init__(config, bits=bits, attention="dequantize", compile_attention=False, **settings)

    def layer_storage(self, layer: LayerGeometry, storage: Storage) -> Storage:
        if layer.index != self.target_layer:
            return FULL_PRECISION
        fields = {field.name: getattr(storage, field.name) for field in dataclasses.fields(storage)}
        return HalfQuantizedStorage(**{**fields, "quantized_half": self.quantized_half})

    def full_attention_layer(self, layer: LayerGeometry, storage: Storage) -> KVLayer:
        return KVLayer(layer, self.layer_storage(layer, storage), head_tokens=self.sink_tokens)


@torch.no_grad()
def chunked_log_probs(model: PreTrainedModel, input_ids: torch.Tensor, cache, chunk: int):
    """Feed `input_ids` (1, n) through `cache` `chunk` tokens at a time, as `evaluation_pass` does; yield, per
    chunk, the float32 log-probabilities [predicted tokens, vocabulary] of the tokens that follow it in the
    text (the last position of the text predicts nothing), and those tokens' ids."""
    input_ids = input_ids.to(input_device(model))
    for start in range(0, input_ids.shape[1], chunk):
        logits = model(input_ids[:, start : start + chunk], **{CACHE_KWARG: cache}, use_cache=True).logits[0]
        targets = input_ids[0, start + 1 : start + chunk + 1]
        yield torch.log_softmax(logits[: len(targets)].float(), dim=-1).cpu(), targets.cpu()


def degradation(
    model: PreTrainedModel, input_ids: torch.Tensor, cache, chunk: int, reference: torch.Tensor
) -> dict[str, float]:
    """Mean over predicted tokens of KL(reference || through `cache`) ("kl") and of the NLL ("nll"), in nats;
    `reference`: the full-precision log-probabilities [n - 1, vocabulary]."""
    kl = nll = 0.0
    done = 0
    for log_probs, targets in chunked_log_probs(model, input_ids, cache, chunk):
        exact = reference[done : done + len(targets)]
        kl += (exact.exp() * (exact - log_probs)).sum().item()
        nll -= log_probs.gather(1, targets[:, None]).sum().item()
        done += len(targets)
    return {"kl": kl / done, "nll": nll / done}


def check_long_enough(tokens: int, cache: QuantizedCache, settings: dict[str, object]) -> None:
    """A text on which no token would ever be quantized measures nothing (every sensitivity 0, every layer at
    the narrowest width): refuse it, naming the lengths."""
    blocks = [
        layer.storage.key_group_size or layer.storage.group_size for layer in cache.layers if hasattr(layer, "storage")
    ]
    needed = settings["sink_tokens"] + settings["residual_length"] + max(blocks, default=0)
    if tokens <= needed:
        raise ValueError(
            f"the calibration text has {tokens} tokens, but with sink_tokens={settings['sink_tokens']}, "
            f"residual_length={settings['residual_length']} and key blocks of {max(blocks, default=0)} tokens nothing is "
            f"quantized before token {needed}: calibrate on more than {needed} tokens (e.g. --tokens 512)"
        )


def calibration_passes(config: PreTrainedConfig, choices: Sequence[int]) -> int:
    """How many quantized passes `calibrate_bit_profile` runs: 2 x len(choices) per layer that stores KV."""
    return len(model_geometry(config).cached_layers) * len(HALVES) * len(check_choices(choices))


def calibrate_bit_profile(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    average_bits: float,
    choices: Sequence[int] = (2, 3, 4),
    chunk: int = 64,
    progress: Callable[[int], object] | None = None,
    source: str = "",
    metric: str = "kl",
    **quantized_cache_settings: object,
) -> BitProfile:
    """Measure every layer's sensitivity to quantized keys and values, and choose its widths under a budget.

    Args:
        model: a causal LM (eval mode).
        input_ids: the calibration text, (1, n) token ids, fed `chunk` tokens per forward (as
            `evaluation_pass`; a chunk sees its own keys in full precision).
        average_bits: the budget: mean over layers of (key bits + value bits) / 2, between min(choices) and
            max(choices).
        choices: the widths a layer's keys or values may take (2, 3, 4, 8).
        chunk: tokens per forward.
        progress: called with 1 after each of the `calibration_passes(model.config, choices)` passes (a tqdm
            `update`).
        source: where the calibration text came from, recorded in the profile.
        metric: the sensitivity measure the widths are chosen by: "kl" (default), the mean KL divergence of
            the next-token distribution from the full-precision one, or "nll", the mean NLL increase on the
            text (see the module's docstring); both in nats per token.
        quantized_cache_settings: the `QuantizedCache` settings to calibrate with (group_size, key_group_size,
            residual_length, sink_tokens, rotate, key_outliers); defaults: the cache's. Use the same ones when
            building the cache from the profile.

    Returns:
        The `BitProfile`: widths, the `metric`'s table (nats/token), the settings, the full-precision NLL and
        the seconds taken. Layers that store no KV (they read another layer's) are not measured: their
        sensitivity is 0, so they get the narrowest width and still count in the average (the layers that
        store KV then average more than `average_bits`).

    Raises:
        ValueError: bad `choices`, an `average_bits` outside [min(choices), max(choices)], an unknown
            `metric` or setting, settings the model's layers cannot hold (named by `QuantizedCache`), a bad
            `chunk` or `input_ids` shape, a text too short for any token to be quantized (sinks + residual +
            one key block). Checked before any pass.
    """
    began = time.perf_counter()
    choices = check_choices(choices)
    check_budget(average_bits, choices)
    check_int("chunk", chunk, minimum=1)
    check_choice("metric", metric, METRICS)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must have shape (1, n) with n >= 2, got {tuple(input_ids.shape)}")
    settings = calibration_settings(**quantized_cache_settings)
    config = model.config
    for bits in choices:  # every width must fit every layer (3 bits: multiples of 8 channels)
        cache = QuantizedCache(config, bits=bits, attention="dequantize", compile_attention=False, **settings)
    check_long_enough(input_ids.shape[1], cache, settings)
    parts = list(chunked_log_probs(model, input_ids, DynamicCache(config=config), chunk))
    reference = torch.cat([log_probs for log_probs, _ in parts])
    targets = torch.cat([ids for _, ids in parts])
    reference_nll = -reference.gather(1, targets[:, None]).mean().item()
    del parts
    layers = model_geometry(config).layers
    tables = {half: [[0.0] * len(choices) for _ in layers] for half in HALVES}
    for layer in layers:
        if layer.kind == SHARED_KIND:
            continue
        for half in HALVES:
            for index, bits in enumerate(choices):
                cache = OneLayerQuantizedCache(config, layer.index, half, bits, **settings)
                measured = degradation(model, input_ids, cache, chunk, reference)
                tables[half][layer.index][index] = measured[metric] - (reference_nll if metric == "nll" else 0.0)
                if progress is not None:
                    progress(1)
    key_bits, value_bits = choose_bits(tables["keys"], tables["values"], choices, average_bits)
    return BitProfile(
        key_bits=key_bits,
        value_bits=value_bits,
        model=str(getattr(model, "name_or_path", "") or config.model_type),
        choices=choices,
        metric=metric,
        key_sensitivity=tables["keys"],
        value_sensitivity=tables["values"],
        cache_settings=settings,
        budget_bits=average_bits,
        source=source,
        tokens=input_ids.shape[1],
        chunk=chunk,
        reference_nll=reference_nll,
        seconds=time.perf_counter() - began,
    )
