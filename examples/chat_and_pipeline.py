"""A pipeline and a multi-turn chat with hf_kvcache caches, on the packaged SmolLM2-135M-Instruct.

1. `pipeline("text-generation", ...)` takes a cache per call (`cache=` on transformers 5.24+,
   `hf_kvcache.CACHE_KWARG` names the keyword): the same call with DynamicCache and with a 4-bit
   QuantizedCache, their texts and the bytes each cache held.
2. A three-turn chat through `ChatSession`, which keeps one cache across turns and feeds only the tokens of
   each turn the cache has not seen (cropping back what the chat template rewrote). Printed per turn: the
   reply, prompt tokens reused from the cache and tokens computed.

    python examples/chat_and_pipeline.py
    python examples/chat_and_pipeline.py --cache sink:sink_tokens=4,window=508 --max-new-tokens 24
"""

import argparse
import textwrap

from transformers import DynamicCache, pipeline

from hf_kvcache import CACHE_KWARG, ChatSession, QuantizedCache, build_cache
from hf_kvcache.eval.memory import cache_bytes
from hf_kvcache.models import MODEL_HELP, load_model
from hf_kvcache.report import format_table

QUESTIONS = [
    "What is a key-value cache in a transformer, in one sentence?",
    "Why does it grow with the length of the conversation?",
    "Name one way to make it smaller.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument(
        "--cache",
        default="quantized:bits=4,residual_length=16",
        help="the chat's cache spec (default: quantized:bits=4,residual_length=16)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens per reply (default: 40)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(args.model)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = [{"role": "user", "content": QUESTIONS[0]}]
    rows = []
    for name, cache in (
        ("DynamicCache", DynamicCache(config=model.config)),
        ("4-bit", QuantizedCache(model.config, residual_length=16)),
    ):
        (out,) = generator(prompt, max_new_tokens=args.max_new_tokens, do_sample=False, **{CACHE_KWARG: cache})
        text = out["generated_text"][-1]["content"]
        print(f"pipeline, {name}:\n{textwrap.indent(text, '  ')}\n")
        rows.append({"cache": name, "bytes held": cache_bytes(cache)})
    print(format_table(rows), "\n")

    session = ChatSession(model, tokenizer, lambda: build_cache(args.cache, model.config))
    messages, rows = [], []
    for turn, question in enumerate(QUESTIONS, 1):
        messages.append({"role": "user", "content": question})
        reused, fed = session.reused_tokens, session.fed_tokens
        reply = session.reply(messages, max_new_tokens=args.max_new_tokens)
        messages.append({"role": "assistant", "content": reply})
        print(f"turn {turn}, user: {question}\nassistant ({args.cache}):\n{textwrap.indent(reply, '  ')}\n")
        rows.append(
            {
                "turn": turn,
                "tokens reused": session.reused_tokens - reused,
                "tokens computed": session.fed_tokens - fed,
                "bytes held": cache_bytes(session.cache),
            }
        )
    print(format_table(rows))


if __name__ == "__main__":
    main()
