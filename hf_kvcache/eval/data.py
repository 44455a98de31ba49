"""Evaluation texts: WikiText-2 and PG-19 from the hub or the bundled copies, and local files.

`load_text` returns the text with a note of where it came from; `tokenize_text` turns it into the
first `max_tokens` token ids. The hub is tried only when it looks reachable (no `HF_HUB_OFFLINE` /
`HF_DATASETS_OFFLINE`, and a short TCP connect succeeds); any failure falls back to the bundled copy.
"""

import gzip
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from hf_kvcache.files import read_regular_file
from hf_kvcache.hub import hub_reachable

logger = logging.getLogger(__name__)

NAMED_DATASETS = ("wikitext2", "pg19")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
BUNDLED = {
    "wikitext2": "wikitext-2-raw-v1.test.txt.gz",
    "pg19": "gutenberg-2554-crime-and-punishment.txt.gz",
}
BUNDLED_NOTE = {
    "wikitext2": "bundled copy of the WikiText-2 raw test split",
    "pg19": "bundled Crime and Punishment (Project Gutenberg #2554) in place of the PG-19 test split",
}


@dataclass(frozen=True)
class Text:
    """A text to evaluate on: the dataset asked for, where the text came from, the text itself, and `sha256`:
    the hash of the file's bytes for a local file (else of the text), so that `--resume` never reuses results
    measured on a file since edited in place."""

    dataset: str
    source: str
    text: str
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.text.encode("utf-8")).hexdigest())


def _from_hub(dataset: str) -> tuple[str, str]:
    from datasets import load_dataset

    if dataset == "wikitext2":
        rows = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
        return "".join(rows["text"]), "hub: Salesforce/wikitext wikitext-2-raw-v1, test split"
    book = next(iter(load_dataset("deepmind/pg19", split="test", streaming=True)))
    return book["text"], f"hub: deepmind/pg19 test split, first book ({book.get('short_book_title', '?')})"


MAX_DATASET_BYTES = 1 << 34  # 16 GiB: far beyond any text evaluated here, short of a sparse or endless file


def bundled_text(dataset: str) -> str:
    """The bundled copy of `wikitext2` or `pg19` (see hf_kvcache/data/PROVENANCE.md)."""
    with resources.files("hf_kvcache").joinpath("data", BUNDLED[dataset]).open("rb") as handle:
        return gzip.decompress(handle.read()).decode("utf-8")


def _read_utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"dataset file {path} is not UTF-8 text: byte {error.start} ({error.reason})") from None


def _from_file(path: Path) -> tuple[str, str]:
    """The text of a local file and the sha256 of the bytes it was parsed from (read once: the hash is of
    the very bytes evaluated, even if the file changes meanwhile)."""
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    data = read_regular_file(path, MAX_DATASET_BYTES, "dataset file")  # a FIFO or device would block or never end
    digest = hashlib.sha256(data).hexdigest()
    if path.suffix == ".txt":
        return _read_utf8(path, data), digest
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(_read_utf8(path, data).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: each JSON line needs a string 'text' field")
            texts.append(record["text"])
        return "\n".join(texts), digest
    import pyarrow.parquet as parquet

    table = parquet.read_table(io.BytesIO(data))
    if "text" not in table.column_names:
        raise ValueError(f"{path}: no 'text' column; columns are: {', '.join(table.column_names)}")
    return "\n".join(value for value in table.column("text").to_pylist() if value), digest


def load_text(dataset: str, use_hub: bool | None = None) -> Text:
    """The text of `dataset`: `wikitext2`, `pg19`, or a local `.txt` / `.jsonl` / `.parquet` file.

    `use_hub`: None tries the hub when it is reachable; False uses the bundled copies directly.
    """
    if dataset in NAMED_DATASETS:
        if use_hub is None:
            use_hub = hub_reachable()
        if use_hub:
            try:
                text, source = _from_hub(dataset)
                return Text(dataset, source, text)
            except Exception as error:  # any hub or parsing failure: the bundled copy is the same data
                logger.warning("loading %s from the hub failed (%s); using the bundled copy", dataset, error)
        return Text(dataset, BUNDLED_NOTE[dataset], bundled_text(dataset))
    path = Path(dataset)
    if path.suffix not in FILE_SUFFIXES:
        raise ValueError(
            f"--dataset {dataset!r} is neither a known dataset ({', '.join(NAMED_DATASETS)}) nor a file "
            f"ending in {', '.join(FILE_SUFFIXES)}"
        )
    text, digest = _from_file(path)
    if not text.strip():
        raise ValueError(f"dataset file {path} holds no text")
    return Text(str(path), f"local file {path} ({path.suffix[1:]})", text, digest)


def tokenize_text(
    text: Text, tokenizer: PreTrainedTokenizerBase, max_tokens: int, option: str = "--max-tokens"
) -> torch.Tensor:
    """The first `max_tokens` token ids of `text`, shape (1, max_tokens); ValueError if it has fewer, naming
    `max_tokens` as the command-line `option` it came from."""
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"{option} {max_tokens!r} must be an integer >= 2")
    characters = max_tokens * 8
    while True:
        complete = characters >= len(text.text)
        ids = tokenizer(text.text[:characters], return_attention_mask=False)["input_ids"]
        if not complete:
            ids = ids[:-1]  # the last token may be cut by the character limit
        if len(ids) >= max_tokens:
            return torch.tensor([ids[:max_tokens]], dtype=torch.long)
        if complete:
            raise ValueError(
                f"{option} {max_tokens:,} is more than the {len(ids):,} tokens of {text.dataset} ({text.source})"
            )
        characters *= 4
