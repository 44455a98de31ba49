"""A left-padded row scores as the same text alone: perplexity of a WikiText-2 passage as row 1 of a
two-row batch (left-padded by `--padding` tokens) and alone, per cache, on the packaged model.

    flock /tmp/hf_kvcache_heavy.lock python benchmarks/padded_rows.py
"""

import argparse

import torch

from hf_kvcache import CACHE_KWARG
from hf_kvcache.eval.data import bundled_text
from hf_kvcache.models import load_model
from hf_kvcache.registry import build_cache
from hf_kvcache.report import format_table


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, mask: torch.Tensor, spec: str, row: int, padding: int) -> float:
    """exp(mean NLL) of row `row`'s real tokens, all fed in one forward through a fresh cache of `spec`,
    then token by token for the last quarter (so those tokens attend the held, quantized, cache)."""
    cache = build_cache(spec, model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    split = ids.shape[1] - ids.shape[1] // 4
    logits = [
        model(
            ids[:, :split], attention_mask=mask[:, :split], position_ids=positions[:, :split], **{CACHE_KWARG: cache}
        ).logits
    ]
    for t in range(split, ids.shape[1]):
        step = model(
            ids[:, t : t + 1],
            attention_mask=mask[:, : t + 1],
            position_ids=positions[:, t : t + 1],
            **{CACHE_KWARG: cache},
        )
        logits.append(step.logits)
    logits = torch.cat(logits, dim=1)[row, padding:-1]
    return float(torch.nn.functional.cross_entropy(logits.float(), ids[row, padding + 1 :]).exp())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=700)
    parser.add_argument("--padding", type=int, default=45)
    parser.add_argument(
        "--specs", nargs="+", default=["dynamic", "quantized:bits=2", "quantized:bits=3", "quantized:bits=4"]
    )
    args = parser.parse_args()
    model, tokenizer = load_model()
    ids = tokenizer(bundled_text("wikitext2")[:20000], return_tensors="pt").input_ids
    longer, text = ids[:, : args.tokens + args.padding], ids[:, args.tokens : 2 * args.tokens]
    pads = torch.full((1, args.padding), tokenizer.pad_token_id or 0)
    batch = torch.cat([longer, torch.cat([pads, text], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, : args.padding] = 0
    rows = []
    for spec in args.specs:
        alone = perplexity(model, text, torch.ones_like(text), spec, 0, 0)
        padded = perplexity(model, batch, mask, spec, 1, args.padding)
        rows.append(
            {
                "cache": spec,
                "alone": f"{alone:.3f}",
                "padded row": f"{padded:.3f}",
                "padded / alone": f"{padded / alone - 1:+.2%}",
            }
        )
        print(rows[-1], flush=True)
    print(f"\n{args.tokens}-token text, row 1 of 2 left-padded by {args.padding}: prefill of 3/4, then token by token")
    print(format_table(rows))


if __name__ == "__main__":
    main()
