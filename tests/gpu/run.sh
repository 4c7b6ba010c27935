#!/usr/bin/env bash
# On a GPU machine: build spiel._C, run the GPU tests, compute-sanitizer on the CUDA kernels and the
# benchmarks, then print a short summary. Stages (default: all but e2e):
#   tests/gpu/run.sh [build] [test] [sanitize] [tune] [bench] [e2e] [paired] [e2e1b] [e2e70b] [profile]
# (each device call is limited to 10 minutes: build+test+sanitize+tune+bench fit one call, e2e another,
#  e2e70b + profile a third; every later call needs `build` first on a fresh machine)
# Logs go to $OUT (default /tmp/spiel-gpu). bitsandbytes wheels in .whl/ are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/spiel-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages="${*:-build test sanitize bench}"
summary=()
has() { [[ " $stages " == *" $1 "* ]]; }
note() { summary+=("$1"); echo "== $1"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if has build; then
  t0=$(date +%s)
  if SPIEL_CUDA_ARCHS="${SPIEL_CUDA_ARCHS:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}" python3 setup.py build_ext --inplace \
       >"$OUT/build.log" 2>&1; then
    note "build: ok in $(( $(date +%s) - t0 )) s"
  else
    tail -40 "$OUT/build.log"; note "build: FAILED (see build.log)"
  fi
  python3 -c "import spiel.ops as o; print({k: (v['available'], v['reason']) for k, v in o.backend_info().items() if isinstance(v, dict)})"
fi

if has test; then
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest tests -q -ra -p no:cacheprovider --timeout=300 -n "${TEST_WORKERS:-8}" --durations=10 \
    -m "gpu and not slow" >"$OUT/gpu_tests.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -40
  grep -E "slowest|^[0-9.]+s (call|setup)" "$OUT/gpu_tests.log" | head -12
  note "gpu tests: $(tail -1 "$OUT/gpu_tests.log") (rc $rc)"
fi

if has sanitize; then
  # SANITIZE_TOOLS / SANITIZE_SCRIPTS narrow the run (racecheck is slow: a few minutes per driver)
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    # sanitize_driver: merge / NF4 kernels; sanitize_sddmm: every sddmm strategy at small shapes
    # (racecheck covers the shared-memory staging and the tile extraction)
    for script in ${SANITIZE_SCRIPTS:-sanitize_driver sanitize_sddmm sanitize_adamw sanitize_select sanitize_replace sanitize_outer}; do
      log="$OUT/${script}_$tool.log"
      if SANITIZE_TOOL=$tool timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool $tool --error-exitcode 9 \
           python3 "tests/gpu/$script.py" >"$log" 2>&1; then
        note "compute-sanitizer $tool $script: clean ($(grep -c 'ERROR SUMMARY: 0' "$log") summaries; $(tail -1 "$log"))"
      else
        tail -20 "$log"; note "compute-sanitizer $tool $script: ERRORS or timeout (see $(basename "$log"))"
      fi
    done
  done
fi

if has tune; then
  timeout 240 python3 benchmarks/bench_forward.py --tune --tune-out "$OUT/tune.json" >"$OUT/tune.log" 2>&1; rc=$?
  tail -40 "$OUT/tune.log"
  note "bench_forward --tune: rc $rc"
fi

if has bench; then
  # BENCH_SCRIPTS narrows the run (each script has its own 300 s limit, BENCH_TIMEOUT)
  for script in ${BENCH_SCRIPTS:-bench_forward bench_sddmm bench_layer bench_optim bench_select}; do
    if [ -f "benchmarks/$script.py" ]; then
      t0=$(date +%s)
      timeout "${BENCH_TIMEOUT:-300}" python3 "benchmarks/$script.py" --csv "$OUT/results.csv" >"$OUT/$script.log" 2>&1; rc=$?
      tail -60 "$OUT/$script.log"
      note "$script: rc $rc in $(( $(date +%s) - t0 )) s"
    fi
  done
fi

if has e2e; then
  timeout 560 python3 benchmarks/bench_e2e.py --model 7b --provider-timeout 150 --budget-s 540 --csv "$OUT/results.csv" \
    ${E2E_ARGS:-} >"$OUT/bench_e2e.log" 2>&1; rc=$?
  tail -40 "$OUT/bench_e2e.log"
  note "bench_e2e: rc $rc"
fi

if has paired; then
  # the 7B providers in one process, windows interleaved (PAIRED_ARGS: e.g. --providers frozen-nf4,qlora,spiel-nf4)
  timeout 560 python3 benchmarks/bench_paired.py --model 7b --csv "$OUT/results.csv" ${PAIRED_ARGS:-} \
    >"$OUT/bench_paired.log" 2>&1; rc=$?
  tail -25 "$OUT/bench_paired.log"
  note "bench_paired: rc $rc"
fi

if has e2e1b; then
  # the 1B-class table (smaller GPUs); every provider, ~6 min on an H100
  timeout 560 python3 benchmarks/bench_e2e.py --model 1b --provider-timeout 120 --budget-s 540 --csv "$OUT/results.csv" \
    ${E2E_ARGS:-} >"$OUT/bench_e2e_1b.log" 2>&1; rc=$?
  tail -40 "$OUT/bench_e2e_1b.log"
  note "bench_e2e 1b: rc $rc"
fi

if has e2e70b; then
  timeout 560 python3 benchmarks/bench_e2e.py --model 70b --provider-timeout 240 --csv "$OUT/results.csv" \
    >"$OUT/bench_e2e_70b.log" 2>&1; rc=$?
  tail -30 "$OUT/bench_e2e_70b.log"
  note "bench_e2e 70b: rc $rc"
fi

if has profile; then
  for prefer in "" "--prefer merge_delta=cuda"; do
    timeout 200 python3 benchmarks/profile_e2e.py --provider spiel-ag --model 7b --no-cycle $prefer \
      >>"$OUT/profile.log" 2>&1; rc=$?
    note "profile_e2e spiel-ag ${prefer:-(auto)}: rc $rc"
  done
  grep -E "^==|plain|wall" "$OUT/profile.log"
fi

echo; echo "==== summary ===="; printf '%s\n' "${summary[@]}"
