"""PNG figures of a run: log-perplexity and cache memory against position, every cache on one figure."""

import math
from pathlib import Path

from hf_kvcache.eval.results import EvalResults


def write_plots(results: EvalResults, folder: Path) -> list[Path]:
    """Write `log_perplexity.png` and `cache_memory.png` into `folder`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    paths = [folder / "log_perplexity.png", folder / "cache_memory.png"]
    mode = f"chunks of {results.chunk_size}" if results.mode == "chunk" else "token by token"
    title = f"{Path(results.model).name}, {results.dataset}, {mode}"

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for r in results.results:
        starts = [1 + b * r.bucket_size for b in range(len(r.bucket_perplexity))]
        middles = [start + min(r.bucket_size, r.tokens - start + 1) / 2 for start in starts]
        mean_nll = [math.log(p) for p in r.bucket_perplexity]
        axis.plot(middles, mean_nll, marker="o", markersize=3, label=f"{r.cache} (ppl {r.perplexity:.2f})")
    axis.set(
        xlabel="position (tokens)", ylabel=f"log perplexity (mean NLL per {results.results[0].bucket_size} tokens)"
    )
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for r in results.results:
        axis.plot(r.memory_positions, [b / 2**20 for b in r.memory_bytes], label=r.cache)
    axis.set(xlabel="position (tokens)", ylabel="cache memory (MiB)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)
    return paths
