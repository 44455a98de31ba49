#!/usr/bin/env bash
# The transformers cache contract on the oldest transformers that pyproject.toml declares.
# A virtual environment that sees this machine's packages (torch, the project, the test tools) but holds
# its own transformers at the declared lower bound, then the contract tests: geometry, the architecture
# matrix, assisted decoding, the quantized / sink / window / score caches, the shared cases.
# Run after scripts/setup.sh. HF_KVCACHE_OLDEST_VENV moves the environment (default .venv-oldest).
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST=$(python - <<'PY'
import re, tomllib
dependencies = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(re.search(r">=([\d.]+)", d).group(1) for d in dependencies if d.startswith("transformers")))
PY
)
VENV=${HF_KVCACHE_OLDEST_VENV:-.venv-oldest}
[ -x "$VENV/bin/python" ] || python -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --quiet "transformers==$OLDEST"
"$VENV/bin/python" -c "import transformers; print('contract tests on transformers', transformers.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_geometry.py tests/test_compat.py tests/test_scoring.py \
  tests/caches/test_architectures.py tests/caches/test_assisted.py tests/caches/test_shared_cases.py \
  tests/caches/test_quantized.py tests/caches/test_sink.py tests/caches/test_window.py
