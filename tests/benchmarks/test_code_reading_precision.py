"""The precision benchmark's measurement, on the packaged model in float32: the README's 1e-4 bound."""

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "code_reading_precision.py"


@pytest.mark.real_model
def test_code_reading_follows_the_dequantize_path_in_float32(real_model):
    decode_logits = runpy.run_path(str(SCRIPT), run_name="code_reading_precision")["decode_logits"]
    model, tokenizer = real_model
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 40, return_tensors="pt").input_ids
    prompt, forced = ids[:, :300], ids[:, 300:308]
    (codes, cache), (dequantized, _) = (decode_logits(model, prompt, forced, a) for a in ("codes", "dequantize"))
    assert codes.shape == (1, 9, model.config.vocab_size)
    assert cache.layers[0].body.quantized_length >= 128  # the steps attended codes, not only the residual
    assert ((codes - dequantized).abs().max() / dequantized.abs().max()).item() < 1e-4
