#!/usr/bin/env bash
# Everything the CUDA path needs proved, unattended, in at most 8 minutes on one H100/H200 (docs/gpu.md).
# Each step has its own time limit (they sum to 480 s), so one that hangs cannot eat the others'.
#
#   bench/gpu_check.sh              on the lent GPU machine (no registry there): with the kit that
#                                   bench/gpu_kit.sh packed into .gpukit/ (carried), it installs the
#                                   wheels offline into a folder put on PYTHONPATH, puts the kit's
#                                   redis-server first on PATH and runs everything with the machine's
#                                   python3. Without a kit (a GPU host of one's own, with a network):
#                                   scripts/bootstrap and .venv, as before.
#   bench/gpu_check.sh --rehearse   the same offline path on a CPU machine, with the stand-in for the lent
#                                   machine's Python and the kit built for it (bench/gpu_kit.sh --rehearse);
#                                   run it inside `unshare -n` to prove it needs no network.
#
# Steps: the kit's install; what torch sees; every import the workers, tests and benches make; the
# redis-server (a clear "no redis-server" line when it cannot run there); then with a GPU the CUDA tests
# (tests/gpu: bf16, bitsandbytes, quantized snapshots, MAX_MEMORY_GB, CUDA workers through Redis, and the
# CPU tests that pin the CUDA decisions), bench/load.py and bench/throughput.py on CUDA; without one
# those report "skipped: no GPU" and a CPU worker answers through the redis-server instead.
# It ends with one summary table; the output goes to docs/gpu-check-<date>.txt (--rehearse:
# .cache/gpu-rehearsal/; GPU_CHECK_LOG_DIR: elsewhere), and the log and the summary to $OUT when set.
# Extra arguments go to the CUDA tests' pytest; GPU_CHECK_BENCHES=0 leaves out the two benches (a retry
# that must fit what is left of the device time). Exit 1 when a step failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$(pwd)
rehearse=0
if [ "${1:-}" = "--rehearse" ]; then rehearse=1; shift; fi
stamp=$(date -u +%Y-%m-%d-%H%M)
mkdir -p .cache
export PYTHONUNBUFFERED=1 PYTORCH_NVML_BASED_CUDA_CHECK=1 HF_HUB_OFFLINE=1 PYTHONNOUSERSITE=1

if [ $rehearse = 1 ]; then
  kit=${GPUKIT_DIR:-.cache/gpu-rehearsal/kit}
  py=.cache/gpu-rehearsal/python/bin/python
  logdir=${GPU_CHECK_LOG_DIR:-.cache/gpu-rehearsal}
  if [ ! -x "$py" ] || [ ! -d "$kit/wheels" ]; then
    echo "gpu_check --rehearse: no stand-in Python or kit: run bench/gpu_kit.sh --rehearse first (it needs the package registries)" >&2
    exit 2
  fi
  py=$root/$py
  label="rehearsal"
else
  kit=${GPUKIT_DIR:-.gpukit}
  logdir=${GPU_CHECK_LOG_DIR:-docs}
  label="gpu-check"
  if [ -d "$kit/wheels" ]; then py=$(command -v python3); else kit=; py=$root/.venv/bin/python; fi
fi
# The limits are the lent machine's (16 cores, idle); a rehearsal on 2 shared cores gets GPU_CHECK_SLOWER (4) times them.
slower=${GPU_CHECK_SLOWER:-$([ $rehearse = 1 ] && echo 4 || echo 1)}
mkdir -p "$logdir"
log="$logdir/$label-$stamp.txt"
step_out="$root/.cache/gpu-check-step.txt"

summary=()
failed=0
row() { summary+=("$(printf '%-38s %-16s %5s  %s' "$1" "$2" "$3" "$4")"); }
step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit, remember its outcome in $last_rc
  local name=$1 limit=$2 start status last
  shift 2
  echo
  echo "=== $name (limit $((limit * slower))s): $*"
  start=$(date +%s)
  timeout --kill-after=10 $((limit * slower)) "$@" 2>&1 | tee "$step_out"
  last_rc=${PIPESTATUS[0]}
  last=$(grep -E "passed|failed|error|msg/s|ready|bound|b/a|x faster|Error|redis-server|torch " "$step_out" \
    | tail -1 | cut -c1-100)
  case $last_rc in
    0) status=ok ;;
    124|137) status="TIMED OUT" ;;
    *) status="FAILED ($last_rc)" ;;
  esac
  [ "$last_rc" = 0 ] || failed=$((failed + 1))
  row "$name" "$status" "$(( $(date +%s) - start ))s" "$last"
}

main() {
echo "$label $stamp on ${HOSTNAME:-?}, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [ -n "$kit" ]; then
  site=$root/.cache/gpukit-site
  rm -rf "$site"
  # Never the network: no index, no configuration (this machine's may name other sources), no deps.
  step "install the kit (offline)" 45 bash -c 'PIP_CONFIG_FILE=/dev/null "$0" -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --disable-pip-version-check --root-user-action=ignore --target "$1" "${@:2}" &&
    echo "$(($# - 1)) wheels installed: ready in $1"' "$py" "$site" "$kit"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$(cd "$kit" && pwd)/bin:$PATH"
  echo "python: $py; PYTHONPATH=$PYTHONPATH; redis-server: $(command -v redis-server)"
else
  step "bootstrap (CUDA build of torch)" 90 scripts/bootstrap
fi
step "what torch sees" 25 bash -c 'if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  "$0" -c "import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\",
    torch.version.cuda, \"gpus\", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"' "$py"
gpu=0
grep -q "gpus \['" "$step_out" && gpu=1
if [ $gpu = 0 ] && grep -q "^NVIDIA" "$step_out"; then  # nvidia-smi lists a GPU that torch cannot use
  failed=$((failed + 1))
  summary[-1]=$(printf '%-38s %-16s %5s  %s' "what torch sees" "FAILED" "-" "nvidia-smi lists a GPU, torch sees none")
fi
step "imports of workers, tests, benches" 45 "$py" bench/gpu_imports.py
step "redis-server" 15 "$py" bench/gpu_redis.py
redis=1
if [ "$last_rc" != 0 ]; then
  redis=0
  summary[-1]=$(printf '%-38s %-16s %5s  %s' "redis-server" "no redis-server" "-" \
    "$(grep -h "no redis-server" "$step_out" | tail -1 | cut -c18-117)")
fi

if [ $gpu = 1 ]; then
  step "CUDA tests + CUDA workers via Redis" 150 "$py" -m pytest -q -rs -p no:cacheprovider \
    tests/gpu tests/unit/test_devices.py tests/unit/test_fork_safety.py tests/unit/test_oom_retry.py \
    "tests/unit/test_snapshot.py::test_quantized_snapshot_holds_the_quantized_weights" "$@"
  if [ "${GPU_CHECK_BENCHES:-1}" = 1 ]; then
    step "bench/load.py --device cuda" 95 "$py" bench/load.py --device cuda --children 1 --only exaone
    step "bench/throughput.py cuda exaone a,b,d" 105 "$py" bench/throughput.py --device cuda --model exaone \
      --modes ab --messages 1000
  else
    row "bench/load.py --device cuda" "skipped" "-" "GPU_CHECK_BENCHES=0"
    row "bench/throughput.py cuda exaone a,b,d" "skipped" "-" "GPU_CHECK_BENCHES=0"
  fi
else
  if [ $redis = 1 ]; then
    step "a CPU worker answers via Redis" 150 "$py" -m pytest -q -p no:cacheprovider tests/integration/test_service.py \
      -k "classifies_with_each_model or bare_celery_client"
  else
    row "a CPU worker answers via Redis" "skipped" "-" "no redis-server"
  fi
  for name in "CUDA tests + CUDA workers via Redis" "bench/load.py --device cuda" "bench/throughput.py cuda exaone a,b,d"; do
    row "$name" "skipped: no GPU" "-" ""
  done
fi

echo
echo "=== summary ($log)"
printf '%-38s %-16s %5s  %s\n' "step" "status" "time" "last figure"
printf '%s\n' "${summary[@]}"
[ $failed = 0 ]
}

main "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then  # at most 8 files of 16 MiB come back from there
  head -c 15000000 "$log" > "$OUT/$(basename "$log")"
  sed -n '/^=== summary/,$p' "$log" > "$OUT/$label-$stamp-summary.txt"
fi
exit "$rc"
