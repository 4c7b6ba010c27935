#!/usr/bin/env bash
# Run spiel's CUDA forward kernels (csrc/merge.cu) under compute-sanitizer on the GPU machine.
# Each tool runs tests/gpu/sanitize_driver.py: every template instantiation at small / odd / misaligned
# shapes, results checked bit-exact (the driver exits 1 on a mismatch).
#   memcheck  : out-of-bounds / misaligned global and shared accesses
#   racecheck : shared-memory hazards (the chunk staging + delta patch between __syncthreads)
#   synccheck : illegal __syncthreads / warp-sync usage (ballot/shfl in the warp searches)
#   initcheck : reads of uninitialised global memory
# Usage: bash benchmarks/gpu_sanitize.sh [tool ...]   (default: all four)
set -euo pipefail
cd "$(dirname "$0")/.."
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
export PYTORCH_NO_CUDA_MEMORY_CACHING=1   # let the sanitizer see every allocation's true bounds
tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(memcheck racecheck synccheck initcheck)
status=0
for tool in "${tools[@]}"; do
  echo "=== compute-sanitizer --tool ${tool}"
  extra=()
  [ "$tool" = initcheck ] && extra=(--track-unused-memory no)
  if ! "$SANITIZER" --tool "$tool" --error-exitcode 3 "${extra[@]}" python tests/gpu/sanitize_driver.py; then
    echo "=== ${tool}: FAILED"; status=1
  fi
done
exit $status
