"""Streaming far past the trained context: dense vs sliding window vs attention sinks, on the real model.

Phase 1, perplexity per 2048-token segment over the first 16,384 tokens of the bundled book (Crime and
Punishment, PG-19 style), token by token through each streaming cache (each token sees only the
cache). The dense baseline runs in chunks of 256 through a DynamicCache, which gives exactly the
token-by-token numbers (a DynamicCache keeps every token; `tests/eval` checks token == chunk mode).
Also cache bytes and ms/token around 2K and 16K tokens.

Phase 2 (`--generate-tokens`), `model.generate` of 20,000 new tokens through SinkCache(4, 1020),
sampling cache bytes and process RSS every 1,000 tokens: memory must stay flat.

    python benchmarks/streaming.py                          # about 45 min on 2 CPU cores
    python benchmarks/streaming.py --max-tokens 4096 --generate-tokens 2000   # quick look
"""

import argparse
import json
import math
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from hf_kvcache import CACHE_KWARG, SinkCache
from hf_kvcache.eval.data import load_text, tokenize_text
from hf_kvcache.eval.perplexity import decode_speed, evaluation_pass
from hf_kvcache.models import load_model
from hf_kvcache.registry import build_cache
from hf_kvcache.report import format_table

SEGMENT = 2048
STREAMING_SPECS = ["window:window=1024", "sink:sink_tokens=4,window=1020", "sink:sink_tokens=4,window=1020,bits=4"]


def timed_pass(model, ids: torch.Tensor, spec: str, step: int) -> dict:
    """Per-token NLL, bytes held and wall time per step for `spec` over `ids`."""
    stamps = [time.perf_counter()]
    with tqdm(total=ids.shape[1], desc=spec, leave=False) as bar:

        def progress(tokens: int) -> None:
            stamps.append(time.perf_counter())
            bar.update(tokens)

        record = evaluation_pass(model, ids, build_cache(spec, model.config), step=step, progress=progress)
    return {"record": record, "step_seconds": torch.tensor(stamps).diff()}


def ms_per_token_around(result: dict, position: int, step: int, span: int = 256) -> float:
    """Mean wall ms per token over the `span` tokens before `position`."""
    seconds = result["step_seconds"]
    last = position // step
    return 1000 * seconds[max(0, last - span // step) : last].sum().item() / span


def segment_perplexities(nll: torch.Tensor, segments: int) -> list[float]:
    return [math.exp(nll[i * SEGMENT : (i + 1) * SEGMENT].mean().item()) for i in range(segments)]


def decode_ms(model, ids: torch.Tensor, spec: str, step: int) -> float:
    """ms per decoded token (16 greedy steps) after feeding `ids` through a fresh `spec` cache."""
    cache = build_cache(spec, model.config)
    record = evaluation_pass(model, ids, cache, step=step)
    return 1000 / decode_speed(model, cache, record.last_logits, steps=16)


def perplexity_phase(model, tokenizer, max_tokens: int, streaming_step: int, specs: list[str]) -> list[dict]:
    text = load_text("pg19", use_hub=False)
    ids = tokenize_text(text, tokenizer, max_tokens)
    segments = max_tokens // SEGMENT
    rows = []
    for spec, step in [("dynamic", 256)] + [(spec, streaming_step) for spec in specs]:
        result = timed_pass(model, ids, spec, step)
        record = result["record"]
        mode = "chunk 256 (= token)" if spec == "dynamic" else ("token" if step == 1 else f"chunk {step}")
        row = {"cache": spec, "mode": mode}
        for index, value in enumerate(segment_perplexities(record.nll, segments)):
            row[f"{index * 2}-{index * 2 + 2}K"] = value
        row["bytes@2K"] = record.bytes_held[SEGMENT // step - 1]
        row[f"bytes@{max_tokens // 1024}K"] = record.bytes_held[-1]
        if step == 1:
            row["ms/tok@2K"] = ms_per_token_around(result, SEGMENT, step)
            row[f"ms/tok@{max_tokens // 1024}K"] = ms_per_token_around(result, max_tokens, step)
        else:  # decode speed after chunked prefills of 2K and of the whole text
            row["ms/tok@2K"] = decode_ms(model, ids[:, :SEGMENT], spec, step)
            row[f"ms/tok@{max_tokens // 1024}K"] = decode_ms(model, ids, spec, step)
        rows.append(row)
        tqdm.write(str(row))
    return rows


class MemoryProbe(LogitsProcessor):
    """Records cache bytes and RSS every `every` generated tokens (logits pass through unchanged)."""

    def __init__(self, cache: SinkCache, every: int):
        self.cache, self.every, self.samples, self.calls = cache, every, [], 0
        self.bar = tqdm(desc="generate", unit="tok")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.bar.update(1)
        if self.calls % self.every == 0:
            rss = psutil.Process().memory_info().rss
            self.samples.append(
                {"generated": self.calls, "cache bytes": self.cache.memory_bytes(), "RSS MiB": rss / 2**20}
            )
            tqdm.write(str(self.samples[-1]))  # a long run shows its figures as it goes
        return scores


def generation_phase(model, tokenizer, new_tokens: int) -> list[dict]:
    messages = [{"role": "user", "content": "Tell me a very long story about a ship crossing the ocean."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    cache = SinkCache(model.config, sink_tokens=4, window=1020)
    probe = MemoryProbe(cache, every=1000)
    output = model.generate(
        **prompt,
        **{CACHE_KWARG: cache},
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        logits_processor=LogitsProcessorList([probe]),
    )
    probe.bar.close()
    generated = output.shape[1] - prompt["input_ids"].shape[1]
    print(f"generated {generated} tokens; cache holds {cache.stored_tokens} of {cache.get_seq_length()} seen")
    return probe.samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--max-tokens", type=int, default=16384, help="tokens of the book (default 16384; 0 skips phase 1)"
    )
    parser.add_argument(
        "--streaming-step", type=int, default=1, help="tokens per forward for the streaming caches (default 1)"
    )
    parser.add_argument("--specs", nargs="+", default=STREAMING_SPECS, help="streaming cache specs")
    parser.add_argument("--generate-tokens", type=int, default=20000, help="phase 2 length; 0 skips it")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results", help="results folder")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model()
    results = {}
    if args.max_tokens:
        with torch.no_grad():
            rows = perplexity_phase(model, tokenizer, args.max_tokens, args.streaming_step, args.specs)
        dense_segments = [value for key, value in rows[0].items() if key in ("2-4K", "4-6K", "6-8K")]
        dense_mean = sum(dense_segments) / len(dense_segments)
        for row in rows:
            segments = [value for key, value in row.items() if key.endswith("K") and "-" in key]
            row["worst segment / dense 2-8K"] = max(segments) / dense_mean
        print("Perplexity per 2048-token segment, bundled Crime and Punishment (SmolLM2-135M, fp32, CPU)")
        print(format_table(rows))
        results["perplexity"] = rows
    if args.generate_tokens:
        samples = generation_phase(model, tokenizer, args.generate_tokens)
        print(format_table(samples))
        results["generation"] = samples
    args.output.mkdir(parents=True, exist_ok=True)
    name = f"streaming-{args.max_tokens}-{args.generate_tokens}.json"
    (args.output / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
