"""PNG figures of a run: log-perplexity and cache memory against position, every cache on one figure."""

import math
from collections.abc import Callable
from pathlib import Path

from hf_kvcache.eval.results import CacheResult, EvalResults


def _log_perplexity_curve(result: CacheResult) -> tuple[list[float], list[float], str]:
    """Bucket middles, mean NLL per bucket, and the legend label."""
    starts = [1 + b * result.bucket_size for b in range(len(result.bucket_perplexity))]
    middles = [start + min(result.bucket_size, result.tokens - start + 1) / 2 for start in starts]
    mean_nll = [math.log(p) for p in result.bucket_perplexity]
    return middles, mean_nll, f"{result.cache} (ppl {result.perplexity:.2f})"


def _memory_curve(result: CacheResult) -> tuple[list[int], list[float], str]:
    return result.memory_positions, [b / 2**20 for b in result.memory_bytes], result.cache


def _draw(
    results: EvalResults,
    curve: Callable[[CacheResult], tuple[list, list, str]],
    ylabel: str,
    path: Path,
    marker: str | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = f"chunks of {results.chunk_size}" if results.mode == "chunk" else "token by token"
    figure, axis = plt.subplots(figsize=(10, 4.5))
    for result in results.results:
        x, y, label = curve(result)
        axis.plot(x, y, marker=marker, markersize=3, label=label)
    axis.set(xlabel="position (tokens)", ylabel=ylabel)
    axis.set_title(f"{Path(results.model).name}, {results.dataset}, {mode}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, not on them
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_plots(results: EvalResults, folder: Path) -> list[Path]:
    """Write `log_perplexity.png` and `cache_memory.png` into `folder`; return their paths."""
    folder = Path(folder)
    bucket = results.results[0].bucket_size
    log_ppl, memory = folder / "log_perplexity.png", folder / "cache_memory.png"
    _draw(results, _log_perplexity_curve, f"log perplexity (mean NLL per {bucket} tokens)", log_ppl, marker="o")
    _draw(results, _memory_curve, "cache memory (MiB)", memory)
    return [log_ppl, memory]
