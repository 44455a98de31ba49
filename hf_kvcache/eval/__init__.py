"""Evaluation of cache strategies: perplexity, cache bytes, peak memory and speed on public texts.

`evaluate(...)` returns an `EvalResults` (one `CacheResult` per cache spec); `hf-kvcache eval` is the
same from the command line, and also writes the table, JSON, CSV and plots.
"""

from hf_kvcache.eval.results import CacheResult, EvalResults
from hf_kvcache.eval.runner import DEFAULT_CACHES, evaluate

__all__ = ["DEFAULT_CACHES", "CacheResult", "EvalResults", "evaluate"]
