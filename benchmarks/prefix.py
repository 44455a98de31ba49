"""Prefix store on the real model: time to first token, cold vs warm, for each backend.

One shared prefix (the first `--prefix-tokens` tokens of the bundled WikiText-2 test text) followed by
`--questions` different short questions. Cold: plain `model.generate` (nothing stored). Warm: for each
backend, one request stores the prefix's blocks, then every question restores them and prefills only
its own tokens. Time to first token (TTFT) is taken inside `generate` by a streamer, at the first
generated token (so it includes the lookup and restore, not the saving that follows). Medians.

    flock /tmp/hf_kvcache_heavy.lock python benchmarks/prefix.py
    python benchmarks/prefix.py --questions 8 --backends memory disk --redis-url redis://host:6379/0

Without `--redis-url`, a throwaway local redis-server is started (and stopped) for the Redis backend.
"""

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hf_kvcache.eval.data import bundled_text
from hf_kvcache.models import load_model
from hf_kvcache.prefix import DiskBackend, MemoryBackend, PrefixCache, RedisBackend, generate_with_prefix_cache
from hf_kvcache.prefix.redis_server import LocalRedisServer
from hf_kvcache.report import format_table

TOPICS = [
    "the main subject", "the dates mentioned", "the people named", "the places named", "the first section",
    "the last section", "any battles", "any ships", "any songs or albums", "any awards", "any sports results",
    "any buildings", "any numbers", "any books", "any films", "any animals", "any weather events", "any elections",
    "any roads", "any rivers", "any churches", "any schools", "any critics", "any companies", "any families",
    "any titles", "any wars", "any kings", "any games", "any television", "any music charts", "any islands",
]  # fmt: skip
TARGETS = {"memory": 0.2, "disk": 0.2, "redis": 0.3}


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


def ttft(run) -> float:
    timer = FirstTokenTimer()
    run(timer)
    return timer.seconds


def make_prompts(tokenizer, prefix_tokens: int, questions: int) -> list[torch.Tensor]:
    text_ids = tokenizer(bundled_text("wikitext2")[:200_000], return_tensors="pt").input_ids[:, :prefix_tokens]
    if text_ids.shape[1] < prefix_tokens:
        raise ValueError(f"the text has only {text_ids.shape[1]} tokens, fewer than --prefix-tokens={prefix_tokens}")
    prompts = []
    for index in range(questions):
        topic = TOPICS[index % len(TOPICS)] + (f" (part {index // len(TOPICS) + 1})" if index >= len(TOPICS) else "")
        question = tokenizer(f"\n\nQuestion: what does the text say about {topic}? Answer:", return_tensors="pt")
        prompts.append(torch.cat([text_ids, question.input_ids], dim=1))
    return prompts


@contextlib.contextmanager
def open_backend(name: str, redis_url: str | None, block_size: int):
    if name == "memory":
        yield PrefixCache(MemoryBackend(max_bytes=4 << 30), block_size)
    elif name == "disk":
        with tempfile.TemporaryDirectory(prefix="hf_kvcache_prefix_") as folder:
            yield PrefixCache(DiskBackend(folder, max_bytes=4 << 30), block_size)
    elif redis_url:
        backend = RedisBackend(redis_url, prefix=f"hf_kvcache:bench:{time.time_ns()}:", socket_timeout=10.0)
        yield PrefixCache(backend, block_size)
        backend.clear()
    else:
        with LocalRedisServer() as server:
            yield PrefixCache(RedisBackend(server.url, socket_timeout=10.0), block_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix-tokens", type=int, default=2048)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--backends", nargs="+", default=["memory", "disk", "redis"], choices=list(TARGETS))
    parser.add_argument("--redis-url", default=None, help="an existing server; default: start a local one")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/prefix.json"))
    args = parser.parse_args()

    model, tokenizer = load_model()
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
        with open_backend(name, args.redis_url, args.block_size) as store:
            timer = FirstTokenTimer()
            started = time.perf_counter()
            generate_with_prefix_cache(model, prompts[0], store, streamer=timer, **greedy)  # stores the prefix
            first_ttft, first_total = timer.seconds, time.perf_counter() - started
            warm_times, identical = [], 0
            for ids, reference in zip(prompts, cold_outputs):
                timer = FirstTokenTimer()
                output = generate_with_prefix_cache(model, ids, store, streamer=timer, **greedy)
                warm_times.append(timer.seconds)
                identical += torch.equal(output, reference)
            stats = store.stats()
        warm = statistics.median(warm_times)
        rows.append(
            {
                "backend": name,
                "cold TTFT s": cold,
                "first request s (miss + save)": first_total,
                "first request TTFT s": first_ttft,
                "warm TTFT s": warm,
                "warm/cold": warm / cold,
                "target": TARGETS[name],
                "met": warm / cold <= TARGETS[name],
                "hit rate": stats["hit_rate"],
                "tokens reused": stats["tokens_reused"],
                "bytes stored": stats["bytes_stored"],
                "same output": f"{identical}/{len(prompts)}",
            }
        )
        print(f"{name}: warm TTFT {warm:.3f}s = {warm / cold:.3f}x cold, hit rate {stats['hit_rate']:.3f}")

    print()
    print(format_table(rows))
    result = {
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "prefix_tokens": args.prefix_tokens,
        "questions": len(prompts),
        "prompt_tokens": [int(p.shape[1]) for p in prompts],
        "block_size": args.block_size,
        "threads": torch.get_num_threads(),
        "cold_ttft_seconds": cold_times,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
