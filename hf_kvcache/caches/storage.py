"""How a layer holds the tokens it keeps: in full precision, or KIVI-quantized.

A store is an append-only sequence of (key, value) tokens with the few edits eviction and `generate`
need: drop the oldest tokens, drop the newest tokens, and batch-dimension operations. Eviction policy
lives in the layers (`caches/base.py`); a store only answers "how are kept tokens held".
"""

from collections.abc import Callable

import torch

from hf_kvcache.quant import QuantizedTensor, dequantize, hadamard_matrix, quantize
from hf_kvcache.quant.packing import check_bits, packed_size

TensorMap = Callable[[torch.Tensor], torch.Tensor]


class KVStore:
    """Base class: the tensors named in `tensor_names` all have the batch as their first dimension."""

    tensor_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        raise NotImplementedError

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

    def map_batch(self, fn: TensorMap) -> None:
        """Apply a batch-dimension operation (beam reorder, repeat, select) to every held tensor."""
        for name in self.tensor_names:
            setattr(self, name, fn(getattr(self, name)))

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.tensor_names)


class FullPrecisionStore(KVStore):
    """Keys and values kept as they came, in the model's dtype."""

    tensor_names = ("keys", "values")

    def __init__(self, template: torch.Tensor):
        empty = template[:, :, :0, :]
        self.keys, self.values = empty.clone(), empty.clone()

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


class QuantizedStore(KVStore):
    """KIVI layout: keys per channel over blocks of `group_size` tokens, values per token over groups of
    `group_size` channels, and a full-precision residual of recent tokens.

    The residual holds between `residual_length` and `residual_length + group_size - 1` tokens; whenever
    it reaches the upper bound the oldest whole blocks are quantized, once. Codes are packed along
    channels, so single tokens can still be evicted from the front: `block_offset` counts the tokens
    of the oldest key block that were already dropped (its statistics stay until the block is empty).
    """

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

    def __init__(self, template: torch.Tensor, bits: int, group_size: int, residual_length: int, rotate: bool):
        check_bits(bits)
        batch, heads, _, head_dim = template.shape
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.rotation = hadamard_matrix(head_dim, template.dtype, template.device) if rotate else None
        codes = template.new_empty((batch, heads, 0, packed_size(head_dim, bits)), dtype=torch.uint8)
        self.key_codes, self.value_codes = codes, codes.clone()
        self.key_scale = template.new_empty((batch, heads, 0, head_dim))
        self.key_min = self.key_scale.clone()
        self.value_scale = template.new_empty((batch, heads, 0, head_dim // group_size))
        self.value_min = self.value_scale.clone()
        self.residual_keys = template[:, :, :0, :].clone()
        self.residual_values = self.residual_keys.clone()
        self.block_offset = 0

    @property
    def quantized_length(self) -> int:
        return self.key_codes.shape[-2]

    def __len__(self) -> int:
        return self.quantized_length + self.residual_keys.shape[-2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.residual_keys = torch.cat([self.residual_keys, keys], dim=-2)
        self.residual_values = torch.cat([self.residual_values, values], dim=-2)
        excess = self.residual_keys.shape[-2] - self.residual_length
        if excess >= self.group_size:
            self._quantize_oldest(excess - excess % self.group_size)

    def _quantize_oldest(self, count: int) -> None:
        keys, values = self.residual_keys[:, :, :count], self.residual_values[:, :, :count]
        if self.rotation is not None:
            keys, values = keys @ self.rotation, values @ self.rotation
        qk = quantize(keys, self.bits, reduce_dim=-2, group_size=self.group_size)
        qv = quantize(values, self.bits, reduce_dim=-1, group_size=self.group_size)
        self.key_codes = torch.cat([self.key_codes, qk.codes], dim=-2)
        self.key_scale = torch.cat([self.key_scale, qk.scale], dim=-2)
        self.key_min = torch.cat([self.key_min, qk.minimum], dim=-2)
        self.value_codes = torch.cat([self.value_codes, qv.codes], dim=-2)
        self.value_scale = torch.cat([self.value_scale, qv.scale], dim=-2)
        self.value_min = torch.cat([self.value_min, qv.minimum], dim=-2)
        self.residual_keys = self.residual_keys[:, :, count:].clone()
        self.residual_values = self.residual_values[:, :, count:].clone()

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The oldest key block may have lost `block_offset` tokens to eviction: pad its codes back to
        # whole blocks so that every block meets its own statistics, then cut the padding off again.
        key_codes = torch.nn.functional.pad(self.key_codes, (0, 0, self.block_offset, 0))
        keys = dequantize(QuantizedTensor(key_codes, self.key_scale, self.key_min, self.bits, 2, self.group_size))[
            :, :, self.block_offset :
        ]
        values = dequantize(
            QuantizedTensor(self.value_codes, self.value_scale, self.value_min, self.bits, 3, self.group_size)
        )
        if self.rotation is not None:
            keys, values = keys @ self.rotation, values @ self.rotation
        return keys, values

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        residual = (self.residual_keys, self.residual_values)
        return [self._dequantized(), residual] if self.quantized_length else [residual]

    def drop_oldest(self, count: int) -> None:
        from_quantized = min(count, self.quantized_length)
        if from_quantized:
            self.block_offset += from_quantized
            emptied_blocks = self.block_offset // self.group_size
            self.block_offset %= self.group_size
            if from_quantized == self.quantized_length:  # nothing quantized left: no partial block either
                emptied_blocks, self.block_offset = self.key_scale.shape[-2], 0
            for name in ("key_codes", "value_codes", "value_scale", "value_min"):
                setattr(self, name, getattr(self, name)[:, :, from_quantized:].clone())
            for name in ("key_scale", "key_min"):
                setattr(self, name, getattr(self, name)[:, :, emptied_blocks:].clone())
        if from_residual := count - from_quantized:
            self.residual_keys = self.residual_keys[:, :, from_residual:].clone()
            self.residual_values = self.residual_values[:, :, from_residual:].clone()

    def drop_newest(self, count: int) -> None:
        residual = self.residual_keys.shape[-2]
        if count > residual:
            raise ValueError(
                f"cannot remove the newest {count} tokens: only the {residual} most recent tokens are still in "
                "full precision, older ones are quantized in blocks. Use a larger residual_length to crop further."
            )
        self.residual_keys = self.residual_keys[:, :, : residual - count].clone()
        self.residual_values = self.residual_values[:, :, : residual - count].clone()
