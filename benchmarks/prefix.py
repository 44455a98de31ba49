"""Prefix store on the real model: time to first token per backend, tier and block format, and hit rates of
eviction policies on a skewed workload.

`ttft`: one shared prefix (the first `--prefix-tokens` tokens of the bundled WikiText-2 test text) and
`--questions` short questions. Cold: plain `model.generate`. Warm: per backend and block format, one
request stores the prefix's blocks, then every question restores them and prefills only its own tokens.
Time to first token (TTFT) is taken inside `generate` by a streamer at the first generated token (lookup
and restore included, the saving that follows not). Medians. `restore ms` times `PrefixCache.restore`
alone (fetch, check, decode, fill a DynamicCache), with and without prefetching.

`workload`: `--documents` passages of Crime and Punishment (`--document-tokens` each) requested with Zipf
popularity (`--zipf`), each request the passage plus its own question. Every request looks its passage
up and stores what was missing (the passage's KV computed once per passage with the model), under a
byte budget of `--budget` of all passages' full-precision bytes; per backend, policy and format: hit
rate, bytes held, evictions, restore time of hits.

    flock /tmp/hf_kvcache_heavy.lock python benchmarks/prefix.py
    python benchmarks/prefix.py ttft --model gemma3-270m --output benchmarks/results/gemma3-270m
    python benchmarks/prefix.py ttft --questions 8 --backends memory redis
    python benchmarks/prefix.py workload --requests 200

Redis servers (and a 3-master Redis Cluster) are started locally and stopped afterwards.
"""

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.eval.data import bundled_text
from hf_kvcache.models import MODEL_HELP, load_model, model_title
from hf_kvcache.prefix import (
    DiskBackend,
    MemoryBackend,
    PrefixCache,
    RedisBackend,
    TieredBackend,
    generate_with_prefix_cache,
)
from hf_kvcache.prefix.codec import encode_block
from hf_kvcache.prefix.redis_server import LocalRedisCluster, LocalRedisServer
from hf_kvcache.report import format_table

TOPICS = [
    "the main subject", "the dates mentioned", "the people named", "the places named", "the first section",
    "the last section", "any battles", "any ships", "any songs or albums", "any awards", "any sports results",
    "any buildings", "any numbers", "any books", "any films", "any animals", "any weather events", "any elections",
    "any roads", "any rivers", "any churches", "any schools", "any critics", "any companies", "any families",
    "any titles", "any wars", "any kings", "any games", "any television", "any music charts", "any islands",
]  # fmt: skip
TTFT_BACKENDS = ["memory", "disk", "redis", "redis-cluster", "memory>redis", "memory>redis (memory emptied)"]
FORMATS = {"fp32": None, "8-bit": 8, "4-bit": 4, "2-bit": 2}


class FirstTokenTimer:
    """A `generate` streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.start, self.first = time.perf_counter(), None
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass

    @property
    def seconds(self) -> float:
        return self.first - self.start


@contextlib.contextmanager
def servers():
    """Backend factories by name, with the servers they need started once and stopped at the end."""
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(LocalRedisServer()).url
        cluster_url = stack.enter_context(LocalRedisCluster()).url
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="hf_kvcache_prefix_"))
        counter = iter(range(1 << 30))

        def redis(**kwargs):
            return RedisBackend(redis_url, prefix=f"bench:{next(counter)}:", socket_timeout=10.0, **kwargs)

        def make(name: str, max_bytes: int | None = None, policy: str = "lru"):
            if name == "memory":
                return MemoryBackend(max_bytes=max_bytes, policy=policy)
            if name == "disk":
                return DiskBackend(Path(folder) / str(next(counter)), max_bytes=max_bytes)
            if name == "redis":
                return redis()
            if name == "redis-cluster":
                return RedisBackend(cluster_url, prefix=f"bench:{next(counter)}:", socket_timeout=10.0, cluster=True)
            if name.startswith("memory>redis"):
                return TieredBackend(MemoryBackend(max_bytes=max_bytes, policy=policy), redis())
            if name == "memory>disk":
                return TieredBackend(MemoryBackend(max_bytes=max_bytes, policy=policy), make("disk"))
            raise ValueError(name)

        yield make


def make_prompts(tokenizer, prefix_tokens: int, questions: int) -> list[torch.Tensor]:
    text_ids = tokenizer(bundled_text("wikitext2")[:200_000], return_tensors="pt").input_ids[:, :prefix_tokens]
    if text_ids.shape[1] < prefix_tokens:
        raise ValueError(f"the text has only {text_ids.shape[1]} tokens, fewer than --prefix-tokens={prefix_tokens}")
    prompts = []
    for index in range(questions):
        topic = TOPICS[index % len(TOPICS)] + (f" (part {index // len(TOPICS) + 1})" if index >= len(TOPICS) else "")
        question = tokenizer(
            f"\n\nQuestion: what does the text say about {topic}? Answer:",
            return_tensors="pt",
            add_special_tokens=False,
        )
        prompts.append(torch.cat([text_ids, question.input_ids], dim=1))
    return prompts


def empty_first_level(store: PrefixCache) -> None:
    if isinstance(store.backend, TieredBackend):
        store.backend.levels[0].clear()


def restore_ms(model, store: PrefixCache, ids: torch.Tensor, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        store.restore(model, ids, DynamicCache(config=model.config), max_tokens=ids.shape[1] - 1)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def ttft(args, model, tokenizer, make) -> dict:
    prompts = make_prompts(tokenizer, args.prefix_tokens, args.questions)
    greedy = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    with torch.no_grad():
        model.generate(prompts[0][:, :64], **greedy)  # warm-up
    cold_outputs, cold_times = [], []
    for ids in prompts:
        timer = FirstTokenTimer()
        cold_outputs.append(model.generate(ids, streamer=timer, **greedy))
        cold_times.append(timer.seconds)
    cold = statistics.median(cold_times)
    print(f"cold TTFT (plain generate, {len(prompts)} prompts of ~{prompts[0].shape[1]} tokens): median {cold:.3f}s")

    rows = []
    for name in args.backends:
        for format_name in args.formats:
            store = PrefixCache(make(name), args.block_size, bits=FORMATS[format_name])
            generate_with_prefix_cache(model, prompts[0], store, **greedy)  # stores the prefix
            warm_times, identical = [], 0
            for ids, reference in zip(prompts, cold_outputs):
                if name.endswith("(memory emptied)"):
                    empty_first_level(store)
                timer = FirstTokenTimer()
                output = generate_with_prefix_cache(model, ids, store, streamer=timer, **greedy)
                warm_times.append(timer.seconds)
                identical += torch.equal(output, reference)
            stats = store.stats()
            warm = statistics.median(warm_times)
            row = {
                "backend": name,
                "format": format_name,
                "bytes/block": stats["bytes_stored"] // max(stats["blocks_saved"], 1),
                "warm TTFT s": warm,
                "warm/cold": warm / cold,
                "restore ms": restore_ms(model, store, prompts[0]),
                "restore ms, no prefetch": restore_ms(model, with_prefetch(store, 0), prompts[0]),
                "hit rate": stats["hit_rate"],
                "same output": f"{identical}/{len(prompts)}",
            }
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
            store.backend.clear()
    print()
    print(format_table(rows))
    return {
        "continuation_quality": continuation_quality(model, tokenizer, args.prefix_tokens, args.block_size),
        "prefetch_over_simulated_links": prefetch_gain(model, tokenizer, args.prefix_tokens, args.block_size),
        "prefix_tokens": args.prefix_tokens,
        "questions": len(prompts),
        "prompt_tokens": [int(p.shape[1]) for p in prompts],
        "block_size": args.block_size,
        "cold_ttft_seconds": cold_times,
        "cold_ttft_median": cold,
        "rows": rows,
    }


@torch.no_grad()
def continuation_quality(model, tokenizer, prefix_tokens: int, block_size: int, continuation_tokens: int = 256) -> list:
    """Perplexity of the text's next `continuation_tokens` tokens after a prefix restored in each block format
    (full precision: the exact prefix), and the largest logit difference to the exact prefix's."""
    ids = tokenizer(bundled_text("wikitext2")[:200_000], return_tensors="pt").input_ids
    prefix, continuation = ids[:, :prefix_tokens], ids[:, prefix_tokens : prefix_tokens + continuation_tokens]
    rows, exact_logits = [], None
    for format_name, bits in FORMATS.items():
        store = PrefixCache(MemoryBackend(max_bytes=None), block_size, bits=bits)
        # A cache without the config keeps every token of every layer: a sliding layer's KV of the whole prefix.
        cache = DynamicCache()
        model(prefix, **{CACHE_KWARG: cache})
        store.save(model, prefix, [(layer.keys, layer.values) for layer in cache.layers])
        restored = DynamicCache(config=model.config)
        assert store.restore(model, prefix, restored) == prefix_tokens
        logits = model(continuation, **{CACHE_KWARG: restored}).logits.float()
        exact_logits = logits if bits is None else exact_logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], continuation[0, 1:])
        first_block = [(layer.keys[0, :, :block_size], layer.values[0, :, :block_size]) for layer in cache.layers]
        fp16_block = [(keys.half(), values.half()) for keys, values in first_block]
        rows.append(
            {
                "format": format_name,
                "bytes/block": store.stats()["bytes_stored"] // store.stats()["blocks_saved"],
                "bytes/block from fp16 KV": len(encode_block("0" * 64, "f", fp16_block, store.block_format)),
                f"perplexity of the next {continuation_tokens} tokens": float(loss.exp()),
                "max |logit - exact|": float((logits - exact_logits).abs().max()),
            }
        )
    print(format_table(rows))
    return rows


class SimulatedLink(MemoryBackend):
    """A memory backend behind a simulated network link: each request waits `latency` seconds plus its bytes
    at `bytes_per_second` (a sleep, which frees the CPU as a real transfer does). Only for measuring what
    prefetching buys when transfers wait on the network: a local redis-server shares this machine's CPU."""

    def __init__(self, latency: float, bytes_per_second: float):
        super().__init__(max_bytes=None)
        self.latency, self.bytes_per_second = latency, bytes_per_second

    def get_prefix(self, keys, parent=None):
        values = super().get_prefix(keys, parent)
        time.sleep(self.latency + sum(map(len, values)) / self.bytes_per_second)
        return values


def prefetch_gain(model, tokenizer, prefix_tokens: int, block_size: int) -> list:
    """Restore time over simulated links, one request for the whole prefix vs requests of 1-4 blocks."""
    prompt = make_prompts(tokenizer, prefix_tokens, 1)[0]
    rows = []
    for name, latency, rate in (("1 ms, 10 Gbit/s", 1e-3, 1.25e9), ("1 ms, 1 Gbit/s", 1e-3, 1.25e8)):
        for format_name in ("fp32", "4-bit"):
            link = SimulatedLink(latency, rate)
            store = PrefixCache(link, block_size, bits=FORMATS[format_name])
            generate_with_prefix_cache(model, prompt, store, max_new_tokens=1, do_sample=False)
            row = {"link": name, "format": format_name}
            for blocks in (0, 1, 2, 4):
                row[f"restore ms, prefetch_blocks={blocks}"] = restore_ms(model, with_prefetch(store, blocks), prompt)
            rows.append(row)
    print(format_table(rows))
    return rows


def with_prefetch(store: PrefixCache, blocks: int) -> PrefixCache:
    """A store over the same backend and format with another `prefetch_blocks`."""
    bits, group = store.block_format.bits, store.block_format.group_size
    return PrefixCache(store.backend, store.block_size, bits=bits, group_size=group, prefetch_blocks=blocks)


def zipf_requests(documents: int, requests: int, exponent: float, seed: int) -> list[int]:
    weights = [1 / (rank + 1) ** exponent for rank in range(documents)]
    order = list(range(documents))
    random.Random(seed).shuffle(order)  # popularity unrelated to position in the book
    return [order[i] for i in random.Random(seed + 1).choices(range(documents), weights, k=requests)]


@torch.no_grad()
def passages(model, tokenizer, count: int, tokens: int) -> list[tuple[torch.Tensor, list]]:
    """`count` consecutive passages of the book and each one's KV `[(keys, values)]` per layer."""
    ids = tokenizer(bundled_text("pg19")[:2_000_000], return_tensors="pt").input_ids
    if ids.shape[1] < count * tokens:
        raise ValueError(f"the book has {ids.shape[1]} tokens, fewer than {count} x {tokens}")
    result = []
    for index in range(count):
        passage = ids[:, index * tokens : (index + 1) * tokens]
        cache = DynamicCache()  # no config: every token of every layer
        model(passage, **{CACHE_KWARG: cache})
        result.append((passage, [(layer.keys, layer.values) for layer in cache.layers]))
    return result


def replay(model, store: PrefixCache, documents, requests: list[int], question: torch.Tensor) -> dict:
    restore_times = []
    for document in requests:
        passage, layers = documents[document]
        ids = torch.cat([passage, question], dim=1)
        started = time.perf_counter()
        restored = store.restore(model, ids, DynamicCache(config=model.config))
        if restored:
            restore_times.append(time.perf_counter() - started)
        store.save(model, ids, [(k[:, :, restored:], v[:, :, restored:]) for k, v in layers], start=restored)
    stats = store.stats()
    return {
        "hit rate": stats["hit_rate"],
        "bytes held": stats["bytes_held"],
        "evictions": stats["evictions"],
        "restore ms (hits)": 1e3 * statistics.median(restore_times) if restore_times else None,
        "tiers": stats.get("tiers"),
    }


def workload(args, model, tokenizer, make) -> dict:
    documents = passages(model, tokenizer, args.documents, args.document_tokens)
    requests = zipf_requests(args.documents, args.requests, args.zipf, seed=0)
    question = tokenizer("\n\nQuestion: who speaks first in this passage? Answer:", return_tensors="pt").input_ids
    probe = PrefixCache(MemoryBackend(max_bytes=None), args.block_size)
    probe.save(model, documents[0][0], documents[0][1])
    full_block = probe.stats()["bytes_stored"] // probe.stats()["blocks_saved"]
    blocks_per_document = args.document_tokens // args.block_size
    budget = int(args.budget * args.documents * blocks_per_document * full_block)
    print(
        f"{args.documents} passages x {blocks_per_document} blocks of {full_block:,} bytes (fp32); budget {budget:,} bytes"
    )
    configurations = [("memory", policy, fmt) for fmt in ("fp32", "4-bit") for policy in ("lru", "lfu", "size")]
    configurations += [("disk", "lru", "fp32"), ("redis", "allkeys-lru", "fp32"), ("redis", "allkeys-lfu", "fp32")]
    configurations += [("memory>disk", "lfu", "fp32"), ("memory>redis", "lfu", "fp32")]
    rows = []
    for name, policy, format_name in configurations:
        backend = make(name, max_bytes=budget, policy=policy.removeprefix("allkeys-"))
        if name == "redis":  # the server's own eviction: its whole memory (with key overhead) over the budget
            backend.client.config_resetstat()
            baseline = int(backend.client.info("memory")["used_memory"])
            backend.client.config_set("maxmemory-policy", policy)
            backend.client.config_set("maxmemory", baseline + budget)
        store = PrefixCache(backend, args.block_size, bits=FORMATS[format_name])
        result = replay(model, store, documents, requests, question)
        tiers = result.pop("tiers")
        row = {"backend": name, "policy": policy, "format": format_name, **result}
        if name == "redis":
            row["evictions"] = int(backend.client.info("stats")["evicted_keys"])
            backend.client.config_set("maxmemory", 0)
            backend.client.config_resetstat()
        row["first-level hit rate"] = tiers[0]["hit_rate"] if tiers else None
        rows.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
        backend.clear()
    print()
    print(format_table(rows))
    return {
        "documents": args.documents,
        "document_tokens": args.document_tokens,
        "requests": args.requests,
        "zipf_exponent": args.zipf,
        "block_size": args.block_size,
        "budget_bytes": budget,
        "budget_fraction_of_fp32": args.budget,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", choices=["ttft", "workload", "all"], default="all")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--prefix-tokens", type=int, default=2048)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--backends", nargs="+", default=TTFT_BACKENDS, choices=TTFT_BACKENDS)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--documents", type=int, default=24)
    parser.add_argument("--document-tokens", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument(
        "--budget", type=float, default=0.25, help="byte budget as a fraction of all passages' fp32 blocks"
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    result = {"model": f"{model_title(args.model)} (fp32, CPU)", "threads": torch.get_num_threads()}
    with servers() as make:
        if args.part in ("ttft", "all"):
            result["ttft"] = ttft(args, model, tokenizer, make)
        if args.part in ("workload", "all"):
            result["workload"] = workload(args, model, tokenizer, make)
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / ("prefix.json" if args.part == "all" else f"prefix-{args.part}.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
