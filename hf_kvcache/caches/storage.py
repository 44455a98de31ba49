"""How a layer holds the tokens it keeps: in full precision, KIVI-quantized, or quantized per token.

A store is an append-only sequence of (key, value) tokens with the few edits eviction and `generate`
need: drop the oldest tokens, drop the newest tokens, keep chosen tokens per head (`gather`, for
score-based eviction), and batch-dimension operations. Eviction policy lives in the layers
(`caches/base.py`); a store only answers "how are kept tokens held".
"""

import copy
import dataclasses
from collections.abc import Callable

import torch

from hf_kvcache.quant import QuantizedTensor, dequantize, quantize, rotation_matrix
from hf_kvcache.quant.groupwise import code_levels
from hf_kvcache.quant.packing import check_bits, packed_size, unpack_codes

TensorMap = Callable[[torch.Tensor], torch.Tensor]


class KVStore:
    """Base class: the tensors named in `tensor_names` all have the batch as their first dimension."""

    tensor_names: tuple[str, ...] = ()
    template_names: tuple[str, str] = ("", "")  # held tensors shaped like the model's keys and values
    keeps_any_tokens = False  # whether `gather` can keep single tokens per batch row and head

    def __len__(self) -> int:
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """The held tensors by name: what `load_state` of an empty store with the same settings takes back."""
        return {name: getattr(self, name) for name in self.tensor_names}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.tensor_names:
            setattr(self, name, state[name])

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Stored tokens, oldest first, as full-precision (keys, values) pieces to be concatenated."""
        raise NotImplementedError

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored tokens as full-precision [batch, heads, tokens, head_dim] keys and values."""
        keys, values = zip(*self.parts())
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

    def drop_oldest(self, count: int) -> None:
        raise NotImplementedError

    def drop_newest(self, count: int) -> None:
        raise NotImplementedError

    def gather(self, indices: torch.Tensor) -> None:
        """Keep, per batch row and head, the stored tokens at `indices` [batch, heads or 1, kept] (ascending)."""
        raise NotImplementedError(f"{type(self).__name__} cannot keep arbitrary tokens per head")

    def map_batch(self, fn: TensorMap) -> None:
        """Apply a batch-dimension operation (beam reorder, repeat, select) to every held tensor."""
        for name in self.tensor_names:
            setattr(self, name, fn(getattr(self, name)))

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.tensor_names)


class FullPrecisionStore(KVStore):
    """Keys and values kept as they came, in the model's dtype."""

    tensor_names = ("keys", "values")
    template_names = ("keys", "values")
    keeps_any_tokens = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        """`keys`/`values`: templates [batch, heads, any, key or value channels] (dtype, device, shape)."""
        self.keys, self.values = keys[:, :, :0].clone(), values[:, :, :0].clone()

    def __len__(self) -> int:
        return self.keys.shape[-2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = torch.cat([self.keys, keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.keys, self.values)]

    def drop_oldest(self, count: int) -> None:
        # Copies, not views: a view would keep the evicted tokens' memory alive.
        self.keys, self.values = self.keys[:, :, count:].clone(), self.values[:, :, count:].clone()

    def drop_newest(self, count: int) -> None:
        keep = len(self) - count
        self.keys, self.values = self.keys[:, :, :keep].clone(), self.values[:, :, :keep].clone()

    def gather(self, indices: torch.Tensor) -> None:
        self.keys, self.values = gather_tokens(self.keys, indices), gather_tokens(self.values, indices)


def gather_tokens(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`tensor[b, h, indices[b, h, i], :]` for [batch, heads, tokens, features] (a new tensor, no view).

    `indices` may have one head shared by all heads ([batch, 1, kept])."""
    index = indices[..., None].expand(*tensor.shape[:2], indices.shape[-1], tensor.shape[-1])
    return tensor.gather(2, index)


def _joined(first: QuantizedTensor, second: QuantizedTensor) -> QuantizedTensor:
    """`first` followed by `second` along the token (or key block) dimension, 2."""
    names = ("codes", "scale", "minimum", "outlier_values", "outlier_index")
    joined = {name: torch.cat([getattr(first, name), getattr(second, name)], dim=2) for name in names[:3]}
    if first.outlier_values is not None:
        joined.update({name: torch.cat([getattr(first, name), getattr(second, name)], dim=2) for name in names[3:]})
    return dataclasses.replace(first, **joined)


class ResidualQuantizedStore(KVStore):
    """What both quantized layouts share: older tokens as packed codes with (scale, minimum) statistics,
    the newest tokens in a full-precision residual, and an optional orthonormal rotation of the channels
    (`rotation_matrix`: Hadamard, or Hadamard x DCT for head sizes that are not powers of two) applied
    before quantizing and undone on read. Values are always quantized per token over groups of
    `group_size` channels; keys per channel (`KEY_REDUCE_DIM = 2`) or per token (3). Keys and values may
    have different channel counts (latent MLA caches)."""

    KEY_REDUCE_DIM: int
    tensor_names = (
        "key_codes",
        "key_scale",
        "key_min",
        "value_codes",
        "value_scale",
        "value_min",
        "residual_keys",
        "residual_values",
    )
    template_names = ("residual_keys", "residual_values")

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        bits: int,
        group_size: int,
        residual_length: int,
        rotate: bool,
        key_bits: int | None = None,
        key_group_size: int | None = None,
        key_outliers: int = 0,
        codebook: str = "uniform",
    ):
        """`bits`/`group_size` are the values' (and the keys' unless `key_bits`/`key_group_size` are given);
        `key_outliers` key elements per group are kept apart in full precision (KIVI layout only); `codebook`
        places the levels of keys and values (`hf_kvcache.quant.groupwise`)."""
        self.key_outliers, self.codebook = key_outliers, codebook
        self.value_bits, self.key_bits = bits, key_bits or bits
        self.value_group, self.key_group = group_size, key_group_size or group_size
        for width in (self.value_bits, self.key_bits):
            check_bits(width)
        self.residual_length = residual_length
        self.key_rotation, self.value_rotation = (
            (rotation_matrix(t.shape[-1], t.dtype, t.device) for t in (keys, values)) if rotate else (None, None)
        )
        self.key_codes, self.key_scale, self.key_min = self._empty_codes(
            keys, self.KEY_REDUCE_DIM, self.key_bits, self.key_group
        )
        self.value_codes, self.value_scale, self.value_min = self._empty_codes(values, 3, bits, group_size)
        self.residual_keys, self.residual_values = keys[:, :, :0].clone(), values[:, :, :0].clone()

    @staticmethod
    def _empty_codes(template: torch.Tensor, reduce_dim: int, bits: int, group: int) -> tuple[torch.Tensor, ...]:
        batch, heads, _, channels = template.shape
        codes = template.new_empty((batch, heads, 0, packed_size(channels, bits)), dtype=torch.uint8)
        stats = template.new_empty((batch, heads, 0, channels if reduce_dim == 2 else channels // group))
        return codes, stats, stats.clone()

    @property
    def quantized_length(self) -> int:
        return self.key_codes.shape[-2]

    def __len__(self) -> int:
        return self.quantized_length + self.residual_keys.shape[-2]

    def _extend_residual(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Append to the residual; return how many tokens it now holds beyond `residual_length`."""
        self.residual_keys = torch.cat([self.residual_keys, keys], dim=-2)
        self.residual_values = torch.cat([self.residual_values, values], dim=-2)
        return self.residual_keys.shape[-2] - self.residual_length

    def _drop_oldest_residual(self, count: int) -> None:
        self.residual_keys = self.residual_keys[:, :, count:].clone()
        self.residual_values = self.residual_values[:, :, count:].clone()

    def _quantize(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[QuantizedTensor, QuantizedTensor]:
        if self.key_rotation is not None:
            keys, values = keys @ self.key_rotation, values @ self.value_rotation
        return (
            quantize(keys, self.key_bits, self.KEY_REDUCE_DIM, self.key_group, self.key_outliers, self.codebook),
            quantize(values, self.value_bits, 3, self.value_group, codebook=self.codebook),
        )

    def _held(self) -> tuple[QuantizedTensor, QuantizedTensor]:
        """The quantized keys and values as held."""
        keys = (self.key_codes, self.key_scale, self.key_min, self.key_bits, self.KEY_REDUCE_DIM, self.key_group)
        values = (self.value_codes, self.value_scale, self.value_min, self.value_bits, 3, self.value_group)
        return QuantizedTensor(*keys, codebook=self.codebook), QuantizedTensor(*values, codebook=self.codebook)

    def _with_quantized(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[QuantizedTensor, QuantizedTensor]:
        """The held codes followed by `keys`/`values` quantized."""
        held_keys, held_values = self._held()
        new_keys, new_values = self._quantize(keys, values)
        return _joined(held_keys, new_keys), _joined(held_values, new_values)

    def _hold(self, keys: QuantizedTensor, values: QuantizedTensor) -> None:
        self.key_codes, self.key_scale, self.key_min = keys.codes, keys.scale, keys.minimum
        self.value_codes, self.value_scale, self.value_min = values.codes, values.scale, values.minimum

    def _unrotated(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key_rotation is None:
            return keys, values
        return keys @ self.key_rotation.mT, values @ self.value_rotation.mT

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        residual = (self.residual_keys, self.residual_values)
        return [self._dequantized(), residual] if self.quantized_length else [residual]

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._held()
        return self._unrotated(dequantize(keys), dequantize(values))

    def _slice_tokens(self, names: tuple[str, ...], tokens: slice) -> None:
        for name in names:
            setattr(self, name, getattr(self, name)[:, :, tokens].clone())

    def drop_newest(self, count: int) -> None:
        """Drop the newest `count` tokens: residual first, then codes (whose remaining tokens read as before)."""
        from_residual = min(count, self.residual_keys.shape[-2])
        self._slice_tokens(("residual_keys", "residual_values"), slice(0, self.residual_keys.shape[-2] - from_residual))
        if count > from_residual:
            self._drop_newest_quantized(count - from_residual)

    def _drop_newest_quantized(self, count: int) -> None:
        self._slice_tokens(self.tensor_names[:6], slice(0, self.quantized_length - count))


class QuantizedStore(ResidualQuantizedStore):
    """KIVI layout: keys per channel over blocks of `group_size` tokens, values per token over groups of
    `group_size` channels, and a full-precision residual of recent tokens.

    The residual holds between `residual_length` and `residual_length + key_group - 1` tokens; whenever
    it reaches the upper bound the oldest whole blocks are quantized, once. Codes are packed along
    channels, so single tokens can leave from either end: `block_lengths` counts the tokens each key
    block still holds (eviction shortens the oldest, `crop` the newest); a block keeps its statistics
    until it is empty, so every remaining token reads back exactly as before.

    Source: KIVI, Liu et al. 2024, https://arxiv.org/abs/2402.02750.
    """

    KEY_REDUCE_DIM = 2
    PER_TOKEN = ("key_codes", "value_codes", "value_scale", "value_min")  # key statistics are per block
    PER_BLOCK = ("key_scale", "key_min", "key_outlier_values", "key_outlier_index")
    tensor_names = ResidualQuantizedStore.tensor_names + PER_BLOCK[2:]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.block_lengths: list[int] = []
        self.oldest_block_start = 0  # tokens eviction removed from the front of the oldest key block
        batch, heads, _, channels = self.residual_keys.shape
        # [batch, heads, blocks, key_outliers, channels]: the value and the position in its block.
        self.key_outlier_values = self.residual_keys.new_empty((batch, heads, 0, self.key_outliers, channels))
        self.key_outlier_index = self.key_outlier_values.to(torch.uint8)

    def state(self) -> dict[str, torch.Tensor]:
        return {
            **super().state(),
            "block_lengths": torch.tensor(self.block_lengths, dtype=torch.int64),
            "oldest_block_start": torch.tensor([self.oldest_block_start], dtype=torch.int64),
        }

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state(state)
        self.block_lengths = state["block_lengths"].tolist()
        self.oldest_block_start = int(state["oldest_block_start"][0])

    def _held(self) -> tuple[QuantizedTensor, QuantizedTensor]:
        keys, values = super()._held()
        if self.key_outliers:
            keys.outlier_values, keys.outlier_index = self.key_outlier_values, self.key_outlier_index
        return keys, values

    def _hold(self, keys: QuantizedTensor, values: QuantizedTensor) -> None:
        super()._hold(keys, values)
        if self.key_outliers:
            self.key_outlier_values, self.key_outlier_index = keys.outlier_values, keys.outlier_index

    def _with_outliers(self, keys: torch.Tensor) -> torch.Tensor:
        """`keys` [batch, heads, quantized tokens, channels], dequantized without outliers, with each kept
        outlier written back at its token (outliers of tokens evicted or cropped from a block are dropped)."""
        if not self.key_outliers:
            return keys
        lengths = torch.tensor(self.block_lengths, device=keys.device)[:, None, None]
        starts = torch.zeros_like(lengths)
        starts[0] = self.oldest_block_start
        index = self.key_outlier_index.long()  # [batch, heads, blocks, outliers, channels]
        kept = (index >= starts) & (index < starts + lengths)
        tokens = keys.shape[-2]
        position = torch.where(kept, index - starts + lengths.cumsum(0) - lengths, tokens)  # `tokens`: a spare row
        written = torch.nn.functional.pad(keys, (0, 0, 0, 1))
        written.scatter_(2, position.flatten(2, 3), self.key_outlier_values.flatten(2, 3))
        return written[:, :, :tokens]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        excess = self._extend_residual(keys, values)
        if excess >= self.key_group:
            count = excess - excess % self.key_group
            self._hold(*self._with_quantized(self.residual_keys[:, :, :count], self.residual_values[:, :, :count]))
            self.block_lengths += [self.key_group] * (count // self.key_group)
            self._drop_oldest_residual(count)

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super()._held()  # outliers are written back below, where blocks may be short
        if all(length == self.key_group for length in self.block_lengths[1:]):
            # The usual case: only the oldest block may have lost tokens to eviction. Pad its codes back to a
            # whole block so every block meets its statistics by broadcasting, then cut the padding off.
            missing = self.key_group - self.block_lengths[0]
            keys.codes = torch.nn.functional.pad(keys.codes, (0, 0, missing, 0))
            dense_keys = dequantize(keys)[:, :, missing:]
        else:
            # Blocks cut short by `crop` in the middle: each token meets its block's statistics explicitly.
            codes = code_levels(unpack_codes(keys.codes, self.key_bits), self.key_bits, self.codebook, keys.scale.dtype)
            repeats = torch.tensor(self.block_lengths, device=codes.device)
            scale, minimum = (t.repeat_interleave(repeats, dim=2) for t in (keys.scale, keys.minimum))
            dense_keys = torch.addcmul(minimum, codes, scale)
        return self._unrotated(self._with_outliers(dense_keys), dequantize(values))

    def snapshot(self) -> "QuantizedStore":
        """A store that keeps holding the tokens held now while this one goes on appending (a shallow copy:
        held tensors are replaced, never written in place, so no tensor is copied)."""
        held = copy.copy(self)
        held.block_lengths = list(self.block_lengths)
        return held

    def whole_blocks(self) -> int | None:
        """How many key blocks, oldest first, hold all `key_group` tokens, when at most the newest block is
        short (after `crop`); None when an older block is short (eviction or a crop followed by appends)."""
        lengths = self.block_lengths
        if any(length != self.key_group for length in lengths[:-1]):
            return None
        return len(lengths) - int(bool(lengths) and lengths[-1] != self.key_group)

    def dequantized_tokens(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized tokens `start:` (all in the newest key block) as full-precision [batch, heads, tokens,
        channels] keys and values, un-rotated; empty when `start` is the quantized length."""
        count = self.quantized_length - start
        if count == 0:
            return self.residual_keys[:, :, :0], self.residual_values[:, :, :0]
        keys = QuantizedTensor(
            self.key_codes[:, :, start:], self.key_scale[:, :, -1:], self.key_min[:, :, -1:], self.key_bits, 2, count
        )
        values = QuantizedTensor(
            self.value_codes[:, :, start:],
            self.value_scale[:, :, start:],
            self.value_min[:, :, start:],
            self.value_bits,
            3,
            self.value_group,
        )
        return self._unrotated(dequantize(keys), dequantize(values))

    def _drop_blocks(self, oldest: int, newest: int) -> None:
        """Forget the statistics of the `oldest` first and `newest` last key blocks (all emptied)."""
        self.block_lengths = self.block_lengths[oldest : len(self.block_lengths) - newest]
        self._slice_tokens(self.PER_BLOCK, slice(oldest, oldest + len(self.block_lengths)))
        if oldest or not self.block_lengths:
            self.oldest_block_start = 0

    def drop_oldest(self, count: int) -> None:
        from_quantized = min(count, self.quantized_length)
        if from_quantized:
            self._slice_tokens(self.PER_TOKEN, slice(from_quantized, None))
            emptied, remaining = 0, from_quantized
            while remaining and remaining >= self.block_lengths[emptied]:
                remaining -= self.block_lengths[emptied]
                emptied += 1
            self._drop_blocks(emptied, 0)
            if remaining:
                self.block_lengths[0] -= remaining
                self.oldest_block_start += remaining
        self._drop_oldest_residual(count - from_quantized)

    def _drop_newest_quantized(self, count: int) -> None:
        self._slice_tokens(self.PER_TOKEN, slice(0, self.quantized_length - count))
        emptied = 0
        while count and count >= self.block_lengths[-1 - emptied]:
            count -= self.block_lengths[-1 - emptied]
            emptied += 1
        if count:
            self.block_lengths[-1 - emptied] -= count
        self._drop_blocks(0, emptied)


class TokenQuantizedStore(ResidualQuantizedStore):
    """Keys and values both quantized per token over groups of `group_size` channels, plus a
    full-precision residual of the newest tokens (at most `residual_length`).

    Every token owns its codes and statistics, so any token can be dropped per batch row and head
    (`gather`): the layout score-based eviction needs, where KIVI's per-channel key blocks would lose
    their statistics. The rotation (on by default) spreads outlier channels, which is what makes
    per-token keys accurate. Tokens leave the residual oldest first and are quantized once.
    """

    KEY_REDUCE_DIM = 3
    keeps_any_tokens = True

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if (excess := self._extend_residual(keys, values)) > 0:
            self._hold(*self._with_quantized(self.residual_keys[:, :, :excess], self.residual_values[:, :, :excess]))
            self._drop_oldest_residual(excess)

    def drop_oldest(self, count: int) -> None:
        from_quantized = min(count, self.quantized_length)
        self._slice_tokens(self.tensor_names[:6], slice(from_quantized, None))  # codes and statistics
        self._drop_oldest_residual(count - from_quantized)

    def gather(self, indices: torch.Tensor) -> None:
        """Rows and heads may keep different numbers of residual tokens: the newest `m` kept tokens of
        every head (`m` the smallest such count) stay in full precision, other kept residual tokens are
        quantized (as they would be when leaving the residual), so every tensor stays dense. Only the
        residual tokens that some head moves to the codes are quantized (none when every head
        drops only quantized tokens)."""
        residual_start = self.quantized_length
        in_residual = int((indices >= residual_start).sum(-1).min())
        older, newest = indices[..., : indices.shape[-1] - in_residual], indices[..., indices.shape[-1] - in_residual :]
        moving = max(0, int(older.max()) + 1 - residual_start) if older.numel() else 0
        keys, values = (
            self._with_quantized(self.residual_keys[:, :, :moving], self.residual_values[:, :, :moving])
            if moving
            else self._held()
        )
        for quantized in (keys, values):
            quantized.codes, quantized.scale, quantized.minimum = (
                gather_tokens(t, older) for t in (quantized.codes, quantized.scale, quantized.minimum)
            )
        self._hold(keys, values)
        self.residual_keys = gather_tokens(self.residual_keys, newest - residual_start)
        self.residual_values = gather_tokens(self.residual_values, newest - residual_start)
