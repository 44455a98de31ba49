"""How closely code-reading decode follows the dequantize path, per dtype, on the packaged model.

Both paths decode the same forced tokens after the same prompt (WikiText-2, bundled) through
`QuantizedCache(bits=4)`; the figure is the largest absolute logit difference over every step, relative to
the largest logit. In float32 the two agree to rounding; in float16 / bfloat16 each path rounds its own
intermediate sums, so they differ more (the README's 1e-4 bound is for float32).

    python benchmarks/code_reading_precision.py             # prompt 300 tokens, 16 steps, ~1 min on 2 cores
"""

import argparse

import torch

from hf_kvcache import QuantizedCache
from hf_kvcache.eval.data import bundled_text
from hf_kvcache.models import load_model


@torch.no_grad()
def decode_logits(
    model, prompt: torch.Tensor, forced: torch.Tensor, attention: str
) -> tuple[torch.Tensor, QuantizedCache]:
    """float64 logits of the prefill's last position and of every forced decoding step, and the cache."""
    cache = QuantizedCache(model.config, bits=4, attention=attention, compile_attention=False)
    logits = [model(prompt, past_key_values=cache).logits[:, -1:]]
    logits += [model(forced[:, step : step + 1], past_key_values=cache).logits for step in range(forced.shape[1])]
    return torch.cat(logits, dim=1).double(), cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    model, tokenizer = load_model()
    ids = tokenizer(bundled_text("wikitext2")[:20_000], return_tensors="pt").input_ids
    prompt, forced = ids[:, : args.prompt_tokens], ids[:, args.prompt_tokens : args.prompt_tokens + args.steps]
    print("| dtype | max abs logit difference / max abs logit |\n| --- | --- |")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = model.to(dtype)
        (codes, _), (dequantized, _) = (decode_logits(model, prompt, forced, a) for a in ("codes", "dequantize"))
        print(
            f"| {str(dtype).removeprefix('torch.')} | {((codes - dequantized).abs().max() / dequantized.abs().max()).item():.1e} |"
        )


if __name__ == "__main__":
    main()
