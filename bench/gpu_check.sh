#!/usr/bin/env bash
# GPU checks in one script of a few minutes, for a CUDA machine: the CUDA tests (bf16, snapshot,
# bitsandbytes 4-bit and 8-bit, MAX_MEMORY_GB, GPU memory figures), then the load benchmark on the
# GPU (bf16 and 4-bit, from the checkpoint and from the snapshot). Prints everything it measures.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0} scripts/bootstrap
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
.venv/bin/python -m pytest -q tests/gpu -rs
.venv/bin/python bench/load.py --device cuda --children 1 "$@"
USE_QUANTIZATION=true .venv/bin/python bench/load.py --device cuda --children 1 --only exaone "$@"
