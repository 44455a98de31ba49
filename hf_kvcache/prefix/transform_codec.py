"""Transform-coded prefix blocks, after KVTC (Staniszewski & Łańcucki 2025, "KV Cache Transform Coding for
Compact Storage in LLM Inference", https://arxiv.org/abs/2511.01815).

Per layer, keys and values are coded as principal components of the layer's features (every KV head's
channels side by side, so components may span heads), calibrated once per model on a text:

1. keys are taken out of RoPE (rotated back by their positions), so one basis serves every position;
2. each token's features minus the calibrated mean are projected on the calibrated basis;
3. the components are given integer widths of 0 to 6 bits by a budget (`allocate_bits`: the widths whose sum is
   `average_bits` per feature and which minimize the sum of variance x 4^-bits, the high-rate error of a uniform
   quantizer; a component with 0 bits is dropped, i.e. restored as its calibrated mean);
4. each kept component is quantized with a fixed step from its calibrated deviation, sqrt(2 pi e) sigma 2^-bits
   (codes whose entropy is about `bits` for a Gaussian; int8, no per-block statistics, no clipping within 8
   deviations), and a layer's codes are entropy-coded with zstd, so a component costs what its values need.

Restores invert the steps (RoPE put back at the block's positions). The first `raw_tokens` tokens of a prompt
(the attention sinks) and blocks shorter than `min_block_tokens` are stored raw, in the model's precision.

`CodecCalibration` is the calibrated part (a safetensors file: per layer the mean, basis and variances of keys and
values, keyed to the model's weights); `TransformCodec` adds a budget and does the coding. Everything read back
(the calibration file, a block's codes) is untrusted and checked before use.
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zstandard
from safetensors.torch import load, save
from transformers import PreTrainedModel

from hf_kvcache.files import read_regular_file
from hf_kvcache.geometry import model_geometry
from hf_kvcache.prefix.keys import weights_digest
from hf_kvcache.rope import Rope
from hf_kvcache.validation import check_int, check_number

FORMAT = "hf_kvcache.transform_codec"
VERSION = "1"
MAX_BITS = 6  # per component: codes are int8, and a 6-bit step leaves +-127 steps = +-8 standard deviations
CODE_LIMIT = 127
# The step of a uniform quantizer whose codes of a Gaussian of deviation sigma carry about b bits of entropy
# (high-rate approximation): h = log2(sqrt(2 pi e) sigma / step) = b.
ENTROPY_STEP = math.sqrt(2 * math.pi * math.e)
CODE_VERSION = "step-1"  # how components are quantized; part of a codec's identity, so blocks of another never decode
KINDS = ("keys", "values")
# A calibration file's cap: float32 bases of 64 layers of 2,896 features, keys and values (8 KV heads x 128: 1,024).
MAX_CALIBRATION_BYTES = 1 << 32


@dataclass(frozen=True, eq=False)
class Decorrelation:
    """One layer's keys or values as principal components: `mean` [features], `basis` [features, features] (one
    orthonormal column per component, by decreasing variance) and `variances` [features], float32; features
    = kv_heads x channels (keys before RoPE)."""

    mean: torch.Tensor
    basis: torch.Tensor
    variances: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor) -> "Decorrelation":
        """The principal components of `features` [tokens, features] (PCA of their covariance, float64)."""
        features = features.double()
        mean = features.mean(dim=0)
        centered = features - mean
        variances, basis = torch.linalg.eigh(centered.T @ centered / max(1, features.shape[0] - 1))
        order = variances.flip(0).clamp(min=0), basis.flip(1)
        return cls(mean.float(), order[1].float().contiguous(), order[0].float())

    def check(self, features: int, what: str) -> None:
        """Raise ValueError unless the tensors are finite, of `features` features, with an orthonormal basis."""
        shapes = (tuple(self.mean.shape), tuple(self.basis.shape), tuple(self.variances.shape))
        if shapes != ((features,), (features, features), (features,)):
            raise ValueError(f"{what}: tensors of shapes {shapes}, the model's layer has {features} features")
        if not all(torch.isfinite(t).all() for t in (self.mean, self.basis, self.variances)):
            raise ValueError(f"{what}: values that are not finite")
        if (self.variances < 0).any():
            raise ValueError(f"{what}: negative variances")
        identity = torch.eye(features)
        if not torch.allclose(self.basis.double().T @ self.basis.double(), identity.double(), atol=1e-3):
            raise ValueError(f"{what}: a basis that is not orthonormal")


def allocate_bits(variances: torch.Tensor, average_bits: float, max_bits: int = MAX_BITS) -> torch.Tensor:
    """Integer widths [features] in [0, max_bits], summing to floor(average_bits x features), that minimize
    sum(variances x 4^-bits): each bit goes where it removes the most error. Giving bits one at a time to the
    largest gain is exact here, since a component's gains (variance x 3/4 x 4^-b for its bit b + 1) fall as b
    grows: the first N gains of all components, ranked, are the optimum of N bits."""
    gains = variances.double()[:, None] * 4.0 ** -torch.arange(max_bits, dtype=torch.float64)
    total = min(int(average_bits * variances.numel()), gains.numel())
    chosen = torch.zeros(gains.numel(), dtype=torch.bool)
    chosen[gains.flatten().argsort(descending=True, stable=True)[:total]] = True
    return chosen.view(gains.shape).sum(dim=1)


@dataclass(frozen=True, eq=False)
class CodecCalibration:
    """Every cached layer's `Decorrelation` of keys and values, and what they were calibrated on.

    `model_digest`: the weights' digest (`keys.weights_digest`: every parameter and buffer, dtype included) of
    the model calibrated; a codec refuses another model. `layer_features`: per cached layer (kv_heads, key
    channels, value channels)."""

    keys: tuple[Decorrelation, ...]
    values: tuple[Decorrelation, ...]
    model_digest: str
    layer_features: tuple[tuple[int, int, int], ...]
    source: str = ""
    tokens: int = 0

    def __repr__(self) -> str:
        return (
            f"CodecCalibration({len(self.keys)} layers, model_digest={self.model_digest[:12]}…, {self.tokens:,} tokens "
            f"of {self.source or 'an unnamed text'})"
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the calibration as a safetensors file (parents created); returns the path."""
        tensors = {}
        for kind in KINDS:
            for index, layer in enumerate(getattr(self, kind)):
                tensors |= {f"{kind}.{index}.{name}": getattr(layer, name).contiguous() for name in _TENSORS}
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "model_digest": self.model_digest,
            "layer_features": json.dumps(self.layer_features),
            "source": self.source,
            "tokens": str(self.tokens),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(save(tensors, metadata=metadata))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CodecCalibration":
        """The calibration `save` wrote, checked (format, version, every layer's tensors).

        Raises:
            OSError: the file cannot be read.
            ValueError: not a regular file of at most 4 GiB, not a transform-codec calibration of this version,
                or tensors missing, misshapen, not finite or without an orthonormal basis (named).
        """
        shown = f"transform codec calibration {os.fspath(path)}"
        data = read_regular_file(path, MAX_CALIBRATION_BYTES, "transform codec calibration")
        try:
            tensors = load(data)
            metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{shown}: not a safetensors file ({error})") from None
        if (metadata.get("format"), metadata.get("version")) != (FORMAT, VERSION):
            raise ValueError(
                f"{shown}: format {metadata.get('format')!r} version {metadata.get('version')!r}; expected "
                f"{FORMAT!r} version {VERSION!r} (written by `hf-kvcache calibrate --transform-codec`)"
            )
        try:
            layer_features = tuple(tuple(int(n) for n in layer) for layer in json.loads(metadata["layer_features"]))
            tokens = int(metadata.get("tokens", "0"))
            layers = {
                kind: tuple(
                    Decorrelation(*(tensors[f"{kind}.{index}.{name}"].float() for name in _TENSORS))
                    for index in range(len(layer_features))
                )
                for kind in KINDS
            }
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{shown}: incomplete ({type(error).__name__}: {error})") from None
        for index, (heads, key_dim, value_dim) in enumerate(layer_features):
            layers["keys"][index].check(heads * key_dim, f"{shown}: layer {index} keys")
            layers["values"][index].check(heads * value_dim, f"{shown}: layer {index} values")
        return cls(
            layers["keys"],
            layers["values"],
            str(metadata.get("model_digest", "")),
            layer_features,
            str(metadata.get("source", "")),
            tokens,
        )


_TENSORS = ("mean", "basis", "variances")


def layer_ropes(model: PreTrainedModel) -> tuple[Rope | None, ...]:
    """The rotary embedding to take out of each cached layer's keys (None: its keys carry no rotation).

    Raises:
        ValueError: a layer whose RoPE cannot be undone (named, with the reason).
    """
    ropes = []
    for layer in model_geometry(model.config).cached_layers:
        if layer.positions == "rope" and layer.rope is None:
            raise ValueError(
                f"{layer.describe()}: the transform codec cannot take RoPE out of its keys: {layer.rope_problem}"
            )
        ropes.append(layer.rope if layer.positions == "rope" else None)
    return tuple(ropes)


def rotate_to(rope: Rope | None, tensor: torch.Tensor, positions: torch.Tensor, slot: str) -> torch.Tensor:
    """`tensor` [..., tokens, channels] rotated by `positions` [tokens] (negative: back out of RoPE) when `slot`
    is the tensor `rope` rotates; unchanged otherwise."""
    if rope is None or rope.slot != slot:
        return tensor
    angles = positions.to(torch.float64)[:, None] * rope.inv_freq[None].to(torch.float64)
    return rope.rotate(tensor.float(), angles.cos().to(tensor.device), angles.sin().to(tensor.device))


@dataclass(frozen=True, eq=False)
class ComponentCode:
    """How one layer's keys or values are coded: `basis` [features, kept] (the kept components), `step` [kept]
    (each one's quantization step) and `mean` [features]."""

    basis: torch.Tensor
    step: torch.Tensor
    mean: torch.Tensor

    @classmethod
    def of(cls, decorrelation: Decorrelation, bits: torch.Tensor) -> "ComponentCode":
        kept = bits > 0
        step = ENTROPY_STEP * decorrelation.variances[kept].sqrt() * 2.0 ** -bits[kept].float()
        return cls(
            decorrelation.basis[:, kept].contiguous(),
            step.clamp(min=torch.finfo(torch.float32).tiny),
            decorrelation.mean,
        )

    @property
    def kept(self) -> int:
        return self.step.numel()


@dataclass(frozen=True, eq=False)
class TransformCodec:
    """Codes a prefix block's KV in about `average_bits` bits per element with a model's `CodecCalibration`; give
    it to `PrefixCache(..., codec=...)`.

    Args:
        calibration: from `hf-kvcache calibrate --transform-codec` (`CodecCalibration.load`) or
            `hf_kvcache.calibration.calibrate_transform_codec`.
        model: the model whose blocks it codes: its weights must be the calibrated ones, and its layers' RoPE
            is taken out of keys.
        average_bits: code bits per stored element, spread over the components by `allocate_bits` (at most
            6 per component); e.g. 1.5 (fp16 holds 16). What zstd makes of them is measured, not promised:
            see `benchmarks/prefix_codec.py`.
        raw_tokens: the first tokens of every prompt (attention sinks) kept raw.
        min_block_tokens: blocks of fewer tokens are kept raw.
        level: zstd compression level (1-22). 3 (zstd's default) by default: on the packaged model (2 bits, a
            2,048-token prefix) it saves in 384 ms with 4,268 bytes per token; level 15 stores 7% fewer bytes (3,979)
            but takes 2,656 ms, about as long as recomputing the prefix.

    Raises:
        ValueError: a parameter out of range (named), a calibration of another model or geometry, or a layer
            whose RoPE cannot be undone.
    """

    calibration: CodecCalibration
    model: PreTrainedModel = field(repr=False)
    average_bits: float = 2.0
    raw_tokens: int = 4
    min_block_tokens: int = 16
    level: int = 3

    def __repr__(self) -> str:
        return (
            f"TransformCodec({self.describe()}, raw_tokens={self.raw_tokens}, min_block_tokens={self.min_block_tokens}, "
            f"level={self.level}, {self.calibration!r})"
        )

    def __post_init__(self) -> None:
        if not isinstance(self.calibration, CodecCalibration):
            raise ValueError(
                f"calibration: a {type(self.calibration).__name__} is not accepted; give a CodecCalibration, e.g. "
                "CodecCalibration.load('codec.safetensors') (first argument; the model comes second)"
            )
        if not isinstance(self.model, torch.nn.Module) or not hasattr(self.model, "config"):
            raise ValueError(
                f"model: a {type(self.model).__name__} is not accepted; give the transformers model the calibration "
                "was made with"
            )
        check_number("average_bits", self.average_bits, unit=f"code bits per element, at most {MAX_BITS}")
        if self.average_bits > MAX_BITS:
            raise ValueError(f"average_bits={self.average_bits!r} must be at most {MAX_BITS}")
        check_int("raw_tokens", self.raw_tokens)
        check_int("min_block_tokens", self.min_block_tokens, minimum=1)
        check_int("level", self.level, minimum=1, maximum=22)
        features = model_geometry(self.model.config).cached_kv_sizes
        if features != self.calibration.layer_features:
            raise ValueError(
                f"the calibration is for layers of (kv_heads, key channels, value channels) "
                f"{self.calibration.layer_features[:2]}..., this model's are {features[:2]}...: another model; "
                "calibrate it for this one with `hf-kvcache calibrate --transform-codec`"
            )
        self.check_model(self.model)
        object.__setattr__(self, "_ropes", layer_ropes(self.model))
        object.__setattr__(self, "_dtype", self.model.dtype)
        bits = {
            kind: [allocate_bits(d.variances, self.average_bits) for d in getattr(self.calibration, kind)]
            for kind in KINDS
        }
        object.__setattr__(self, "_bits", bits)
        codes = {
            kind: [ComponentCode.of(d, b) for d, b in zip(getattr(self.calibration, kind), bits[kind])]
            for kind in KINDS
        }
        object.__setattr__(self, "_codes", codes)

    def check_model(self, model: PreTrainedModel) -> None:
        """Raise ValueError unless `model`'s weights are the ones the calibration was made with."""
        digest = weights_digest(model)
        if digest != self.calibration.model_digest:
            raise ValueError(
                f"the transform codec was calibrated for another model (weights digest "
                f"{self.calibration.model_digest[:12]}…, this model's {digest[:12]}…; a change of dtype counts): "
                "calibrate it for this one with `hf-kvcache calibrate --transform-codec` (and its --dtype)"
            )

    @property
    def identity(self) -> str:
        """A digest of the calibration's tensors and the settings: blocks are keyed by it, so blocks coded
        with another calibration or budget are never decoded with this one."""
        digest = hashlib.sha256(self.calibration.model_digest.encode())
        for kind in KINDS:
            for layer in getattr(self.calibration, kind):
                for name in _TENSORS:
                    digest.update(getattr(layer, name).contiguous().numpy().tobytes())
        digest.update(f"{CODE_VERSION}:{self.average_bits}:{self.raw_tokens}:{self.min_block_tokens}".encode())
        return digest.hexdigest()

    def describe(self) -> str:
        if not hasattr(self, "_identity"):
            object.__setattr__(self, "_identity", self.identity)
        return f"transform codec {self._identity[:16]}, {self.average_bits:g} bits"

    def bits(self, kind: str, layer: int) -> torch.Tensor:
        """The widths [features] of layer `layer`'s `kind` ("keys" or "values") components."""
        return self._bits[kind][layer]

    def _raw_count(self, tokens: int, position: int) -> int:
        if tokens < self.min_block_tokens:
            return tokens
        return max(0, min(tokens, self.raw_tokens - position))

    def encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor, position: int) -> dict[str, torch.Tensor]:
        """The stored tensors of layer `layer`'s block: keys and values `(1, kv_heads, tokens, channels)` of the
        prompt's tokens `position, position + 1, ...`."""
        tokens = keys.shape[-2]
        raw = self._raw_count(tokens, position)
        state = {"raw_keys": keys[..., :raw, :].contiguous(), "raw_values": values[..., :raw, :].contiguous()}
        positions = torch.arange(position + raw, position + tokens)
        compressor = zstandard.ZstdCompressor(level=self.level)
        for kind, tensor in zip(KINDS, (keys, values)) if raw < tokens else ():
            code = self._codes[kind][layer]
            rotated = rotate_to(self._ropes[layer], tensor[0, :, raw:].float(), -positions, kind)
            features = rotated.transpose(0, 1).reshape(tokens - raw, -1)
            coefficients = (features - code.mean) @ code.basis
            codes = (coefficients / code.step).round().clamp(-CODE_LIMIT, CODE_LIMIT).to(torch.int8)
            compressed = compressor.compress(codes.T.contiguous().view(torch.uint8).numpy().tobytes())
            state[f"{kind}_codes"] = torch.frombuffer(bytearray(compressed), dtype=torch.uint8)
        return state

    def decode(
        self, layer: int, state: dict[str, torch.Tensor], tokens: int, position: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(kv_heads, tokens, channels)` of `encode`'s tensors, in the model's dtype.

        Raises:
            ValueError: tensors missing or of other shapes or dtypes than this codec writes for the block, or
                codes that do not decompress to exactly the block's codes.
        """
        if not 0 <= layer < len(self.calibration.layer_features):
            raise ValueError(f"layer {layer}: the calibration has {len(self.calibration.layer_features)} layers")
        heads, key_dim, value_dim = self.calibration.layer_features[layer]
        raw = self._raw_count(tokens, position)
        coded = tokens - raw
        expected = {"raw_keys": (1, heads, raw, key_dim), "raw_values": (1, heads, raw, value_dim)}
        names = set(expected) | ({f"{kind}_codes" for kind in KINDS} if coded else set())
        if set(state) != names:
            raise ValueError(f"tensors {sorted(state)}, expected {sorted(names)}")
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape or state[name].dtype != self._dtype:
                raise ValueError(
                    f"{name} is {state[name].dtype} {tuple(state[name].shape)}, expected {self._dtype} {shape}"
                )
        restored = []
        positions = torch.arange(position + raw, position + tokens)
        decompressor = zstandard.ZstdDecompressor()
        for kind, channels in zip(KINDS, (key_dim, value_dim)):
            raw_part = state[f"raw_{kind}"][0]
            if not coded:
                restored.append(raw_part)
                continue
            code = self._codes[kind][layer]
            codes = _decompress(decompressor, state[f"{kind}_codes"], code.kept * coded).view(torch.int8)
            coefficients = codes.view(code.kept, coded).T.float() * code.step
            features = coefficients @ code.basis.T + code.mean
            rotated = features.view(coded, heads, channels).transpose(0, 1)
            tensor = rotate_to(self._ropes[layer], rotated, positions, kind).to(self._dtype)
            restored.append(torch.cat([raw_part, tensor], dim=-2))
        return restored[0], restored[1]


def _decompress(decompressor: zstandard.ZstdDecompressor, blob: torch.Tensor, size: int) -> torch.Tensor:
    """`size` uint8 codes from a zstd frame, refusing a frame of another size (before decompressing more)."""
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"codes are {blob.dtype} {tuple(blob.shape)}, expected a 1-D uint8 zstd frame")
    try:
        data = decompressor.decompress(blob.numpy().tobytes(), max_output_size=size)
    except zstandard.ZstdError as error:
        raise ValueError(f"codes do not decompress: {error}") from None
    if len(data) != size:
        raise ValueError(f"codes decompress to {len(data)} bytes, the block holds {size}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if size else torch.zeros(0, dtype=torch.uint8)
