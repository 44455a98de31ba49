"""Result records of an evaluation run, and their table, JSON and CSV forms."""

import csv
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from hf_kvcache.report import format_table

T = TypeVar("T")

RATIO_FIGURES = ("perplexity", "cache_bytes", "peak_memory_bytes", "prefill_tokens_per_s", "decode_tokens_per_s")
CSV_COLUMNS = (
    "cache",
    "tokens",
    "perplexity",
    "mean_nll",
    "cache_bytes",
    "peak_memory_bytes",
    "peak_memory_kind",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    *(f"{figure}_ratio" for figure in RATIO_FIGURES),
)


@dataclass
class CacheResult:
    """Everything measured for one cache spec.

    `tokens` is the number of predicted tokens (the text length minus one); `nll[i]` is the NLL of
    token i + 1; `bucket_perplexity[b]` covers predicted tokens `b * bucket_size` up to the next bucket;
    `memory_positions[i]` tokens had been fed when the cache held `memory_bytes[i]` bytes;
    `ratios` divide each figure of `RATIO_FIGURES` by the first cache's.
    """

    cache: str
    spec: dict
    tokens: int
    perplexity: float
    mean_nll: float
    bucket_size: int
    bucket_perplexity: list[float]
    nll: list[float]
    memory_positions: list[int]
    memory_bytes: list[int]
    cache_bytes: int
    peak_memory_bytes: int
    peak_memory_kind: str
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float
    ratios: dict[str, float | None] = field(default_factory=dict)


@dataclass
class EvalResults:
    """A whole run: its settings, where the data came from, library versions, one result per cache, and how
    the work was split (`distribution`: `num_processes`, per process its device and caches, `reused` results
    of an interrupted run)."""

    model: str
    dataset: str
    data_source: str
    mode: str
    chunk_size: int | None
    max_tokens: int
    decode_tokens: int
    seed: int
    device: str
    dtype: str
    versions: dict[str, str]
    results: list[CacheResult]
    distribution: dict = field(default_factory=dict)  # processes, their devices and caches; reused results

    def fill_ratios(self) -> None:
        """Set each result's ratios to the first cache of the run."""
        base = self.results[0]
        for result in self.results:
            for figure in RATIO_FIGURES:
                value, reference = getattr(result, figure), getattr(base, figure)
                result.ratios[figure] = None if value is None or not reference else value / reference

    def table_rows(self) -> list[dict]:
        rows = []
        for r in self.results:
            rows.append(
                {
                    "cache": r.cache,
                    "ppl": r.perplexity,
                    "ppl x": r.ratios["perplexity"],
                    "cache MiB": r.cache_bytes / 2**20,
                    "bytes x": r.ratios["cache_bytes"],
                    "peak MiB": r.peak_memory_bytes / 2**20,
                    "prefill tok/s": "-" if r.prefill_tokens_per_s is None else r.prefill_tokens_per_s,
                    "prefill x": "-" if r.ratios["prefill_tokens_per_s"] is None else r.ratios["prefill_tokens_per_s"],
                    "decode tok/s": r.decode_tokens_per_s,
                    "decode x": r.ratios["decode_tokens_per_s"],
                }
            )
        return rows

    def segment_rows(self) -> list[dict]:
        """Per segment of `bucket_size` predicted tokens: each cache's perplexity there and the MiB it held
        when the segment ended (flat for a streaming cache, growing for a dense one)."""
        rows = []
        first = self.results[0]
        for index in range(len(first.bucket_perplexity)):
            start = index * first.bucket_size + 1
            end = min(start + first.bucket_size - 1, first.tokens)
            row: dict = {"tokens": f"{start:,}-{end:,}"}
            for result in self.results:
                held = next(
                    (b for p, b in zip(result.memory_positions, result.memory_bytes) if p >= end + 1),
                    result.memory_bytes[-1],
                )
                row[f"{result.cache} ppl"] = result.bucket_perplexity[index]
                row[f"{result.cache} MiB"] = held / 2**20
            rows.append(row)
        return rows

    def table(self) -> str:
        chunk = f", chunks of {self.chunk_size}" if self.mode == "chunk" else ", one token at a time"
        header = f"{self.model} on {self.dataset} ({self.data_source}), {self.max_tokens:,} tokens{chunk}"
        return header + "\n" + format_table(self.table_rows())

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    def write_csv(self, path: Path) -> None:
        """One row per cache with the scalar figures and their ratios."""
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for r in self.results:
                row = {column: getattr(r, column) for column in CSV_COLUMNS if hasattr(r, column)}
                row.update({f"{figure}_ratio": r.ratios[figure] for figure in RATIO_FIGURES})
                writer.writerow(row)


class PartialResults:
    """Each result saved as soon as it is measured, under `folder/<settings digest>/`, so an interrupted run
    loses at most the result in progress and `--resume` reuses only results of the same settings (model,
    data, length, mode, seed, ...). Files are written atomically (a rename)."""

    def __init__(self, folder: Path, settings: dict):
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.folder = Path(folder) / digest
        self.settings = settings

    def _path(self, label: str) -> Path:
        return self.folder / f"{hashlib.sha256(label.encode()).hexdigest()[:16]}.json"

    def save(self, label: str, result: object) -> None:
        """Save `result` (a dataclass) under `label`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"settings": self.settings, "label": label, "result": asdict(result)}, default=str)
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(record)
        os.replace(temporary, self._path(label))

    def load(self, kind: type[T]) -> dict[str, T]:
        """Results of type `kind` saved by earlier runs with these settings, by label (unreadable files and
        those of other settings are skipped)."""
        found = {}
        settings = json.loads(json.dumps(self.settings, default=str))
        for path in sorted(self.folder.glob("*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                if record.get("settings") == settings:
                    found[record["label"]] = kind(**record["result"])
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                continue
        return found
