import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import shared_data_file

import hf_kvcache.eval.data as data
from hf_kvcache.eval.data import bundled_text, load_text, tokenize_text


class CharTokenizer:
    """One id per character: enough to check how many tokens a text has."""

    def __call__(self, text, return_attention_mask=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["x", None, "y"], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    assert load_text(str(tmp_path / "a.txt")).text == "hello world"
    jsonl = load_text(str(tmp_path / "a.jsonl"))
    assert jsonl.text == "one\ntwo" and "jsonl" in jsonl.source
    assert load_text(str(tmp_path / "a.parquet")).text == "x\ny"


def test_local_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="wikitext2, pg19"):
        load_text("books.csv")
    (tmp_path / "b.jsonl").write_text('{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"b.jsonl:1: .*'text' field"):
        load_text(str(tmp_path / "b.jsonl"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="no 'text' column; columns are: body"):
        load_text(str(tmp_path / "b.parquet"))
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no text"):
        load_text(str(tmp_path / "empty.txt"))


def test_bundled_copies_match_shared_data():
    wikitext = load_text("wikitext2", use_hub=False)
    assert wikitext.text == shared_data_file("wikitext-2-raw-v1.test.txt").read_text(encoding="utf-8")
    assert "bundled" in wikitext.source
    pg19 = load_text("pg19", use_hub=False)
    assert "Crime and Punishment" in pg19.source
    assert pg19.text == gzip.decompress(
        gzip.compress(shared_data_file("gutenberg-2554-crime-and-punishment.txt").read_bytes())
    ).decode("utf-8")
    assert bundled_text("pg19") == pg19.text


def test_hub_used_when_reachable_and_fallback(monkeypatch):
    monkeypatch.setattr(data, "_from_hub", lambda name: ("hub text", f"hub: {name}"))
    assert load_text("wikitext2", use_hub=True).source == "hub: wikitext2"

    def failing(name):
        raise ConnectionError("no route")

    monkeypatch.setattr(data, "_from_hub", failing)
    assert "bundled" in load_text("wikitext2", use_hub=True).source


def test_tokenize_text_takes_a_prefix_and_refuses_too_many():
    text = data.Text("t", "test", "abcdefghij" * 100)
    ids = tokenize_text(text, CharTokenizer(), 15)
    assert torch.equal(ids, torch.tensor([[ord(c) for c in ("abcdefghij" * 2)[:15]]]))
    assert tokenize_text(text, CharTokenizer(), 1000).shape == (1, 1000)
    with pytest.raises(ValueError, match="--max-tokens 1,001 is more than the 1,000 tokens of t"):
        tokenize_text(text, CharTokenizer(), 1001)
    with pytest.raises(ValueError, match="must be an integer >= 2"):
        tokenize_text(text, CharTokenizer(), 1)


def test_jsonl_with_json_values(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["a\nb", "c"]), encoding="utf-8")
    assert load_text(str(path)).text == "a\nb\nc"


def test_special_files_are_refused_not_read(tmp_path):
    import os

    from hf_kvcache.files import UnsafeFile

    os.mkfifo(tmp_path / "fifo.txt")  # opened plainly, it blocks until a writer comes
    os.symlink("/dev/zero", tmp_path / "zero.txt")  # read plainly, it never ends
    for name in ("fifo.txt", "zero.txt"):
        with pytest.raises(UnsafeFile, match=f"dataset file {tmp_path / name} is not a regular file"):
            load_text(str(tmp_path / name))
