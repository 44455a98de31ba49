"""Knorm: keep the tokens whose keys have the lowest L2 norm."""

from dataclasses import dataclass

import torch

from hf_kvcache.policies.base import EvictionPolicy, Step, register_policy


@register_policy("knorm", "Knorm: keep the keys with the lowest L2 norm (reads no attention)")
@dataclass(frozen=True)
class Knorm(EvictionPolicy):
    """Keeps the `budget` tokens whose keys have the lowest L2 norm (low-norm keys draw high attention),
    in prefill and decoding; reads no attention.

    Source: Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", https://arxiv.org/abs/2406.11430.
    """

    def score(self, step: Step) -> torch.Tensor:
        return -step.keys.float().norm(dim=-1)
