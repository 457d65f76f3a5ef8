#!/usr/bin/env bash
# Everything the CUDA path needs proved, unattended, in at most 8 minutes on one H100/H200 from a
# fresh checkout (docs/gpu.md). Each step has its own time limit (they sum to 480 s), so one that
# hangs cannot eat the others'. Steps:
#   1. bootstrap (it must end with a CUDA build of torch on this host) and what torch sees;
#   2. the CUDA tests: bf16 and KoELECTRA on CUDA, bitsandbytes 4/8-bit, a quantized snapshot written
#      and loaded on CUDA, MAX_MEMORY_GB that fits / spills to CPU memory / refuses, cuda:N out of
#      range; a prefork worker with 2 CUDA children and the batching GPU worker, both answering
#      through a real Redis; and the CPU tests that pin the CUDA decisions, run on a GPU host;
#   3. bench/load.py on CUDA (EXAONE-2.4B layout);
#   4. bench/throughput.py --device cuda --model exaone: one forward per task (a), the batching
#      worker (b), the in-process ceiling (d).
# It ends with one summary table; the whole output goes to docs/gpu-check-<date>.txt (and to $OUT
# when that is set, for a machine whose files come back from there). Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
stamp=$(date -u +%Y-%m-%d-%H%M)
log="docs/gpu-check-$stamp.txt"
mkdir -p docs .cache
export PYTHONUNBUFFERED=1 PYTORCH_NVML_BASED_CUDA_CHECK=1 HF_HUB_OFFLINE=1

summary=()
step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit, remember its outcome
  local name=$1 limit=$2 start rc last
  shift 2
  echo
  echo "=== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee ".cache/gpu-check-step.txt"
  rc=${PIPESTATUS[0]}
  last=$(grep -E "passed|failed|error|msg/s|ready|bound|b/a|x faster|Error" ".cache/gpu-check-step.txt" | tail -1 | cut -c1-90)
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT" ;;
    *) status="FAILED ($rc)" ;;
  esac
  summary+=("$(printf '%-34s %-12s %5ss  %s' "$name" "$status" "$(( $(date +%s) - start ))" "$last")")
}

main() {
echo "gpu_check $stamp on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
step "bootstrap (CUDA build of torch)" 90 scripts/bootstrap
step "what torch sees" 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv &&
  .venv/bin/python -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
  [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"'
step "CUDA tests + CUDA workers via Redis" 150 .venv/bin/python -m pytest -q -rs -p no:cacheprovider \
  tests/gpu tests/unit/test_devices.py tests/unit/test_fork_safety.py tests/unit/test_oom_retry.py \
  "tests/unit/test_snapshot.py::test_quantized_snapshot_holds_the_quantized_weights" "$@"
step "bench/load.py --device cuda" 100 .venv/bin/python bench/load.py --device cuda --children 1 --only exaone
step "bench/throughput.py cuda exaone a,b,d" 110 .venv/bin/python bench/throughput.py --device cuda --model exaone \
  --modes ab --messages 1000

echo
echo "=== summary ($log)"
printf '%-34s %-12s %6s  %s\n' "step" "status" "time" "last figure"
printf '%s\n' "${summary[@]}"
}

main "$@" 2>&1 | tee "$log"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then cp "$log" "$OUT/"; fi
