"""StreamingLLM as a policy: the first tokens (attention sinks) plus the most recent ones."""

from dataclasses import dataclass

import torch

from hf_kvcache.policies.base import EvictionPolicy, Step, keep_top, register_policy


@register_policy("streaming-llm", "StreamingLLM policy: each row's first `sink_tokens` real tokens + the newest")
@dataclass(frozen=True)
class StreamingLLM(EvictionPolicy):
    """Keeps each row's first `sink_tokens` real tokens and its newest `budget - sink_tokens` tokens. Kept
    tokens keep their positions (no re-rotation: `SinkCache` is the streaming cache that re-rotates sinks
    and holds them in KIVI storage); with left padding each row's sinks are its own first real tokens.

    Source: Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks",
    https://arxiv.org/abs/2309.17453.
    """

    sink_tokens: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_within_budget(sink_tokens=self.sink_tokens)

    def score(self, step: Step) -> torch.Tensor:
        return step.positions.float()  # the newest first

    def select(self, step: Step, budget: int) -> torch.Tensor:
        return keep_top(step, self.score(step), budget, sink_tokens=self.sink_tokens)
