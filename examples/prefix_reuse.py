"""Reuse a long shared prompt prefix across requests with the prefix store: time to first token, cold vs warm.

Every request is the same document (the first `--prefix-tokens` tokens of the bundled WikiText-2 test
text, like a system prompt or a retrieved document) followed by a different question, in the model's
chat format. The first request finds the store empty (cold): it computes the whole prompt and saves
its complete blocks of `--block-size` tokens. The next ones (warm) restore the document's KV from the store and compute only
their question. Time to first token (TTFT) is the time of `generate_with_prefix_cache(...,
max_new_tokens=1)`; "no store" is plain `model.generate` on the same prompts.

The store runs on the in-process memory backend, and also on Redis when `--redis-url` is given (for
example `redis://127.0.0.1:6379/0`; the script uses its own key namespace and deletes it at the end).
Finally the last question is answered through the warm store and through plain `generate`: with the
default DynamicCache the two outputs are the same tokens.

    python examples/prefix_reuse.py
    python examples/prefix_reuse.py --prefix-tokens 256 --block-size 64 --requests 3
    python examples/prefix_reuse.py --redis-url redis://127.0.0.1:6379/0
"""

import argparse
import statistics
import time
import uuid

import torch

from hf_kvcache import MemoryBackend, PrefixCache, RedisBackend, generate_with_prefix_cache
from hf_kvcache.eval.data import load_text, tokenize_text
from hf_kvcache.models import MODEL_HELP, load_model
from hf_kvcache.report import format_table

QUESTIONS = [
    "Who is the article about?",
    "Which television series did he appear in?",
    "Name one play he performed in.",
    "In which city is the Bush Theatre?",
    "What year did his career start?",
    "Summarise the text in one sentence.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--prefix-tokens", type=int, default=1024, help="shared document tokens (default: 1024)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per stored block (default: 256)")
    parser.add_argument(
        "--requests", type=int, default=4, help=f"requests per backend, 2 to {len(QUESTIONS)} (default: 4)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens of the final answer (default: 24)")
    parser.add_argument("--redis-url", default=None, help="also run on this Redis server, e.g. redis://host:6379/0")
    args = parser.parse_args()
    if not 2 <= args.requests <= len(QUESTIONS):
        parser.error(f"--requests must be between 2 and {len(QUESTIONS)}")
    if args.prefix_tokens < args.block_size:
        parser.error("--prefix-tokens must be at least --block-size (only whole blocks are stored)")
    return args


def timed(function, *args, **kwargs) -> tuple[object, float]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


@torch.no_grad()
def plain_generate(model, input_ids: torch.Tensor, max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
    return model.generate(
        input_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id, use_cache=True
    )


def ask(tokenizer, document: torch.Tensor, question: str) -> torch.Tensor:
    """Token ids of one request: the document, then the question, in the model's chat format if it has one.

    The chat text is rendered around a marker and split there, so every request starts with exactly the
    same tokens (chat header + document) and only the question's tokens differ.
    """
    marker = "<<document>>"
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": f"{marker}\n\nQuestion about the text above: {question}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"{marker}\n\nQuestion: {question}\nAnswer:"
    before, after = text.split(marker)
    pieces = [tokenizer(piece, add_special_tokens=False, return_tensors="pt").input_ids for piece in (before, after)]
    return torch.cat([pieces[0], document, pieces[1]], dim=1)


def run_backend(model, prompts: list[torch.Tensor], store: PrefixCache, pad_token_id: int) -> list[dict]:
    """One request per prompt through `store` (empty at first); a row per request."""
    rows = []
    for index, input_ids in enumerate(prompts):
        reused_before = store.stats()["tokens_reused"]
        _, seconds = timed(
            generate_with_prefix_cache,
            model,
            input_ids,
            store,
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
        rows.append(
            {
                "request": index + 1,
                "state": "cold" if index == 0 else "warm",
                "prompt tokens": input_ids.shape[1],
                "restored tokens": store.stats()["tokens_reused"] - reused_before,
                "TTFT ms": 1000 * seconds,
            }
        )
    return rows


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(args.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    document = tokenize_text(load_text("wikitext2", use_hub=False), tokenizer, args.prefix_tokens)
    prompts = [ask(tokenizer, document, question) for question in QUESTIONS[: args.requests]]
    plain_generate(model, prompts[0][:, :32], 1, pad)  # warm-up

    no_store = [1000 * timed(plain_generate, model, ids, 1, pad)[1] for ids in prompts]
    backends = {"memory": MemoryBackend()}
    if args.redis_url:
        backends["redis"] = RedisBackend(args.redis_url, prefix=f"hf_kvcache:example:{uuid.uuid4().hex}:")

    summary, stores = [], {}
    for name, backend in backends.items():
        store = stores[name] = PrefixCache(backend, block_size=args.block_size)
        rows = run_backend(model, prompts, store, pad)
        print(f"--- {name} backend ---")
        print(format_table(rows), "\n")
        cold, warm = rows[0]["TTFT ms"], statistics.median(row["TTFT ms"] for row in rows[1:])
        summary.append(
            {
                "backend": name,
                "no store TTFT ms": statistics.median(no_store),
                "cold TTFT ms": cold,
                "warm TTFT ms": warm,
                "cold / warm": cold / warm,
                "hit rate": f"{store.stats()['hit_rate']:.0%}",
                "bytes stored": store.stats()["bytes_stored"],
            }
        )

    print(
        f"{args.requests} requests: a {document.shape[1]}-token document + a question each; "
        f"blocks of {args.block_size} tokens; warm = median of requests 2-{args.requests}"
    )
    print(format_table(summary))

    last = prompts[-1]
    answer = generate_with_prefix_cache(
        model, last, stores["memory"], max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad
    )
    reference = plain_generate(model, last, args.max_new_tokens, pad)
    print(f"\nQuestion: {QUESTIONS[args.requests - 1]}")
    print(f"Answer (warm store): {tokenizer.decode(answer[0, last.shape[1] :], skip_special_tokens=True).strip()!r}")
    print(f"same tokens as plain generate: {torch.equal(answer, reference)}")
    for name, store in stores.items():
        print(f"{name}: {store!r}")
    if "redis" in backends:
        backends["redis"].clear()


if __name__ == "__main__":
    main()
