"""Memory figures: bytes a cache holds, and the process's peak memory while a cache is evaluated."""

import threading

import torch
from transformers.cache_utils import Cache


def _tensor_bytes(value: object, seen: set[int]) -> int:
    """Bytes of every tensor reachable through tensors, tuples, lists and dicts (each tensor once)."""
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
            names, _ = value.__tensor_flatten__()  # quantized wrapper tensors (optimum-quanto)
            return sum(_tensor_bytes(getattr(value, name), seen) for name in names)
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item, seen) for item in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(item, seen) for item in value.values())
    return 0


def cache_bytes(cache: Cache) -> int:
    """Bytes the cache holds: its own `memory_bytes()` when it has one, else the tensors its layers hold."""
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    seen: set[int] = set()
    return sum(_tensor_bytes(list(vars(layer).values()), seen) for layer in cache.layers)


class PeakMemory:
    """Peak memory over a `with` block: `torch.cuda.max_memory_allocated` on CUDA, else sampled RSS.

    On CPU a thread samples the resident set size every `interval` seconds (psutil), so very short
    spikes can be missed; `kind` says which figure was taken.
    """

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak = 0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            process = psutil.Process()
            self.peak = process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
            self._thread.start()
        return self

    def _sample(self, process) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            import psutil

            self.peak = max(self.peak, psutil.Process().memory_info().rss)
