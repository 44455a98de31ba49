#!/usr/bin/env bash
# The transformers cache contract on the oldest transformers that pyproject.toml declares.
# A virtual environment that sees the packages of the Python running this script (torch, the project, the
# test tools: a system Python's or an active virtual environment's) but holds its own transformers at the
# declared lower bound, then the contract tests: geometry, the architecture matrix, assisted decoding, the
# quantized / sink / window / score caches, the shared cases.
# `--system-site-packages` would not do: it sees the base interpreter's packages, not an active venv's.
# Instead the new environment gets a .pth file that adds the running Python's site directories after its
# own (their .pth files, e.g. the project's editable install, included), so its transformers comes first.
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
PARENT_SITES=$(python -c 'import site, sys; print(repr([*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE and sys.prefix == sys.base_prefix else [])]))')
[ -x "$VENV/bin/python" ] || python -m venv "$VENV"
VENV_SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; list(map(site.addsitedir, $PARENT_SITES))" > "$VENV_SITE/_hf_kvcache_parent_site.pth"
"$VENV/bin/python" -m pip install --quiet --no-deps "transformers==$OLDEST"
"$VENV/bin/python" -m pip check >/dev/null || "$VENV/bin/python" -m pip install --quiet "transformers==$OLDEST"
"$VENV/bin/python" -c "import transformers, torch; print('contract tests on transformers', transformers.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_geometry.py tests/test_compat.py tests/test_scoring.py \
  tests/caches/test_architectures.py tests/caches/test_assisted.py tests/caches/test_shared_cases.py \
  tests/caches/test_hybrid.py tests/caches/test_deferred_stop.py \
  tests/caches/test_quantized.py tests/caches/test_sink.py tests/caches/test_window.py
