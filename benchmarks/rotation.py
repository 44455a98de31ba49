"""Does the rotation for head sizes that are not powers of two cost quality? Measured on the real model.

Head sizes such as 96 (Phi-3) or 80 (Phi-2) get `rotation_matrix`'s Hadamard x DCT construction
(Hadamard of the power-of-two factor, Kronecker with the orthonormal DCT of the odd factor). The
packaged SmolLM2 has head size 64, where the default is plain Hadamard; to measure the construction
on the same model, this run forces a DCT factor onto the 64 channels (64 = 16 x 4 and 8 x 8, the
same structure as 80 = 16 x 5 and 72 = 8 x 9) and compares, at the same bits and protocol
(WikiText-2 test, first `--max-tokens` tokens in chunks of 64, `QuantizedCache` defaults otherwise):
no rotation, Hadamard 64, Hadamard 16 x DCT 4, Hadamard 8 x DCT 8, and a plain DCT 64.

    python benchmarks/rotation.py                      # 2048 tokens, bits 2/3/4 (about 6 min on 2 cores)
    python benchmarks/rotation.py --max-tokens 512 --bits 2
"""

import argparse
import functools
import json
from pathlib import Path
from unittest import mock

from hf_kvcache import QuantizedCache
from hf_kvcache.caches import storage
from hf_kvcache.eval.data import load_text, tokenize_text
from hf_kvcache.eval.perplexity import evaluation_pass
from hf_kvcache.models import load_model
from hf_kvcache.quant.rotation import rotation_matrix
from hf_kvcache.report import format_table

ROTATIONS = {  # label: DCT factor forced on the head (None: the default; "off": rotate=False)
    "none": "off",
    "Hadamard 64 (default)": None,
    "Hadamard 16 x DCT 4": 4,
    "Hadamard 8 x DCT 8": 8,
    "DCT 64": 64,
}


def perplexity(model, input_ids, bits: int, dct_size) -> float:
    cache = QuantizedCache(model.config, bits=bits, rotate=dct_size != "off")
    forced = functools.partial(rotation_matrix, dct_size=dct_size) if isinstance(dct_size, int) else rotation_matrix
    with mock.patch.object(storage, "rotation_matrix", forced):
        return evaluation_pass(model, input_ids, cache, step=64).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/rotation.json"))
    args = parser.parse_args()
    model, tokenizer = load_model()
    text = load_text("wikitext2", use_hub=False)
    input_ids = tokenize_text(text, tokenizer, args.max_tokens)
    rows = []
    for bits in args.bits:
        for label, dct_size in ROTATIONS.items():
            rows.append({"bits": bits, "rotation": label, "ppl": perplexity(model, input_ids, bits, dct_size)})
            print(rows[-1], flush=True)
    print(format_table([{**row, "ppl": f"{row['ppl']:.3f}"} for row in rows]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"max_tokens": args.max_tokens, "source": text.source, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
