#!/usr/bin/env bash
# One GPU session: install, GPU tests, the canonical layer benchmark, the design variants, the
# pytest-benchmark suite — most important first, so a session cut short still brings back the
# main results. Every step runs even if an earlier one fails; exit codes go to exit-codes.txt.
# Results land in bench/results/ (to commit) and are copied to $OUT (the only folder the device
# tool brings back).
#   bash bench/gpu_run.sh                              # from the repository root, or anywhere
#   BENCH_ARGS="--preset tiny" bash bench/gpu_run.sh   # other `fastpeft bench` arguments (a dry run on CPU)
#   SKIP_VARIANTS=1 SKIP_PYTEST_BENCH=1 bash bench/gpu_run.sh
#   TEST_SHARDS=4 MODEL_SHARDS=3 SKIP_WARM=0 ...      # parallel slices of the gpu tests; compile-only warm-ups
#   QUANT_PRESETS="decode-tiny qlora-tiny e2e-tiny mixed-tiny" ...  # 4-bit, e2e, mixed at CPU sizes ("" skips)
# bitsandbytes is not on the device: run bench/prepare_device.sh here first and carry .whl
# (run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=600)).
# The whole script keeps inside BUDGET_S seconds (default 560, for a 600 s call): each step gets at most
# what is left (less a margin for the summary at the end), and a step with under 30 s left is skipped, so
# the script always reaches its summary and exit codes instead of being killed mid-benchmark.
# PYTHON (default python3: on the device image "python3" is the interpreter that holds PyTorch; a bare
# "python"/"pip"/"pytest" may not be on PATH there) runs every Python step, pip and pytest as modules.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # a step stopped at its time limit still leaves its output in the logs
t_start=$(date +%s)
budget=${BUDGET_S:-560}
left() { echo $((budget - 20 - ($(date +%s) - t_start))); }  # 20 s kept for the summary
# limit SECONDS: the smaller of SECONDS and what is left; 0 when under 30 s is left (skip the step).
limit() { local l; l=$(left); [ "$l" -lt 30 ] && { echo 0; return; }; [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
# bounded SECONDS CMD...: CMD under `timeout` for at most limit SECONDS; skipped (status 124) when no time is
# left — never `timeout 0`, which would mean no limit at all.
bounded() {
  local t; t=$(limit "$1"); shift
  if [ "$t" = 0 ]; then echo "skipped (out of time): $*"; return 124; fi
  timeout -k 10 "$t" "$@"
}
out="${OUT:-bench/results}"
mkdir -p "$out" bench/results
device=$($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' \
         | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-*$//')
name="bench/results/${device}-$(date -u +%Y%m%dT%H%M%SZ)"
bench_args=${BENCH_ARGS:---preset layer}
copy_out() { [ "$(realpath "$out")" = "$(realpath bench/results)" ] || cp "$name"* "$out/" 2>/dev/null; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$out/timeline.txt"; }

# No internet on the GPU box: no build isolation, no dependency resolution.
stamp install
timeout 120 $PY -m pip install --no-deps --no-build-isolation --no-index -e . >"$out/pip.log" 2>&1; rc_pip=$?
if [ "$rc_pip" != 0 ]; then
  # Used from the checkout instead (fastpeft maps kernels/ to fastpeft.kernels itself then).
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "pip install failed (rc=$rc_pip): running from the checkout with PYTHONPATH" | tee -a "$out/pip.log"
fi
if [ -d .whl/site ]; then  # bitsandbytes and peft unpacked by bench/prepare_device.sh
  export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c 'import bitsandbytes as b; print("bitsandbytes", b.__version__)' >>"$out/pip.log" 2>&1
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
$PY -c 'import torch, triton; print(torch.__version__, triton.__version__)' >>"$out/pip.log" 2>&1
$PY -c 'import peft, transformers; print("peft", peft.__version__, peft.__file__, "transformers", transformers.__version__)' \
  >>"$out/pip.log" 2>&1

# Parallel phase (16 cores there; Triton compiles one kernel at a time per process). Side by side:
# - the kernel gpu tests in TEST_SHARDS slices (pytest --shard I/N, tests/conftest.py): their results are
#   the results. Correctness only: one config per launch (FASTPEFT_AUTOTUNE=0);
# - one compile-only warm-up (fastpeft bench --compile-only: every autotune config each launch of that run
#   would time, compiled, nothing timed) per slice of each timed run below, filling Triton's on-disk cache,
#   so the timed runs afterwards compile nothing and do not share the GPU with anything. On CPU,
#   bench/aot_compile.py --only bench, then --only bench-tuned into one TRITON_CACHE_DIR, checks that a
#   warm-up compiles every kernel its timed run looks up ("new in the on-disk cache: 0").
# Before this phase, one serial call spent an estimated
# 200–250 s compiling for the kernel tests alone and ~2–3 min compiling inside the layer bench's autotuning.
kernel_tests="tests/test_kernels.py tests/test_gemv4bit.py tests/test_quant.py tests/test_mixed.py"
tests_budget=${TESTS_TIMEOUT:-300}
t_tests=$(date +%s)
stamp "parallel: kernel gpu tests (${TEST_SHARDS:-4} slices) + compile-only warm-ups"
jobs_pids=()
shards=${TEST_SHARDS:-4}
for i in $(seq 0 $((shards - 1))); do
  # shellcheck disable=SC2086  # kernel_tests is a list of words
  FASTPEFT_AUTOTUNE=0 bounded "$tests_budget" $PY -m pytest -m gpu $kernel_tests -q -p no:cacheprovider -rs \
    --shard "$i/$shards" --durations=10 --junitxml="$out/junit-gpu-kernels-$i.xml" \
    >"$out/pytest-gpu-kernels-$i.log" 2>&1 &
  jobs_pids+=($!)
done
warm_pids=()
warm() {  # warm TAG [VAR=value ...] -- BENCH ARGS...: one compile-only warm-up in the background
  local tag=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  # shellcheck disable=SC2086
  bounded "$tests_budget" env ${envs[@]+"${envs[@]}"} $PY -m fastpeft bench "$@" --compile-only >"$out/warm-$tag.log" 2>&1 &
  warm_pids+=($!)
}
if [ "${SKIP_WARM:-0}" != 1 ]; then
  for prov in fastpeft fastpeft_bf16; do
    for p in 0.1 0.0; do
      # shellcheck disable=SC2086  # bench_args is a list of words
      warm "layer-$prov-$p" -- $bench_args --providers $prov --dropout $p
    done
  done
  for preset in ${QUANT_PRESETS-decode qlora mixed e2e dora}; do
    case $preset in
      e2e*) warm "$preset-0.05" -- --preset "$preset" --dropout 0.05; warm "$preset-0.1" -- --preset "$preset" --dropout 0.1 ;;
      dora*) warm "$preset-0.1" -- --preset "$preset" --dropout 0.1; warm "$preset-0.0" -- --preset "$preset" --dropout 0.0 ;;
      *) warm "$preset" -- --preset "$preset" ;;
    esac
  done
  if [ "${SKIP_VARIANTS:-0}" != 1 ]; then
    for variant in "FASTPEFT_DX_DROPOUT=epilogue" "FASTPEFT_GEMM=pointer"; do
      # shellcheck disable=SC2086
      warm "$(echo "$variant" | tr 'A-Z=' 'a-z-')" "$variant" -- $bench_args --providers fastpeft --dropout 0.1 --no-check
    done
  fi
fi
# The model-level gpu tests (Inductor, torchrun DDP, autocast, checkpointing, DoRA) in MODEL_SHARDS slices,
# in the same phase: nothing waits on anything else, and all of it ends within TESTS_TIMEOUT.
mshards=${MODEL_SHARDS:-3}
for i in $(seq 0 $((mshards - 1))); do
  # shellcheck disable=SC2046  # one --ignore per kernel test file
  FASTPEFT_AUTOTUNE=0 bounded "$tests_budget" $PY -m pytest -m gpu tests $(printf -- '--ignore=%s ' $kernel_tests) \
    -q -p no:cacheprovider -rs --shard "$i/$mshards" --durations=10 --junitxml="$out/junit-gpu-model-$i.xml" \
    >"$out/pytest-gpu-model-$i.log" 2>&1 &
  jobs_pids+=($!)
done
rc_tests=0
for pid in "${jobs_pids[@]}"; do wait "$pid" || rc_tests=1; done
cat "$out"/pytest-gpu-kernels-*.log "$out"/pytest-gpu-model-*.log >"$out/pytest-gpu.log" 2>/dev/null
rc_warm=0
for pid in "${warm_pids[@]}"; do wait "$pid" || rc_warm=1; done
stamp "parallel phase done in $(($(date +%s) - t_tests))s (gpu tests rc=$rc_tests, warm-ups rc=$rc_warm)"
grep -h -E "passed|failed|error|skipped" "$out"/pytest-gpu-*.log | grep -E "^(=|[0-9])" | tee "$out/pytest-gpu-summary.txt"

# The canonical cells (TARGETS.md), with the autotuner's choices in the log.
stamp bench
# shellcheck disable=SC2086  # bench_args is a list of words
TRITON_PRINT_AUTOTUNING=1 bounded 600 $PY -m fastpeft bench $bench_args --out "$name.json" --plot "$name.png" 2>&1 | tee "$out/bench.log"
rc_bench=${PIPESTATUS[0]}
copy_out

# 4-bit: decode GEMV N=1/4/16 (TARGETS.md §3) and the QLoRA layer fwd+bwd (§2); the GEMV's
# autotune pick per shape is in the log (and collected in autotune-picks.txt at the end).
# Then e2e: one training step of the TinyLlama-1.1B-shaped model, bf16 and NF4, vs peft (§5),
# and mixed-adapter batches: 1/4/16/64 adapters vs single-adapter, peft adapter_names, frozen (§4);
# last, DoRA layers (fastpeft vs peft, p = 0 and 0.1).
rc_quant=0
for preset in ${QUANT_PRESETS-decode qlora mixed e2e dora}; do
  stamp "bench $preset"
  extra=""
  case $preset in e2e*) extra="--dropout 0.05 0.1" ;; esac  # TARGETS.md §5: both sides at both dropouts
  # shellcheck disable=SC2086
  TRITON_PRINT_AUTOTUNING=1 bounded 600 $PY -m fastpeft bench --preset "$preset" $extra --out "$name-$preset.json" \
      --plot "$name-$preset.png" 2>&1 \
    | tee "$out/bench-$preset.log"
  rc_quant=$((rc_quant || PIPESTATUS[0]))
  copy_out
done

# Design choices decided by measurement: where dx's dropout term goes, and which GEMM kernel.
rc_var=0
if [ "${SKIP_VARIANTS:-0}" != 1 ]; then
  for variant in "FASTPEFT_DX_DROPOUT=epilogue" "FASTPEFT_GEMM=pointer"; do
    stamp "variant $variant"
    tag=$(echo "$variant" | tr 'A-Z=' 'a-z-')
    # shellcheck disable=SC2086
    bounded 600 env "$variant" TRITON_PRINT_AUTOTUNING=1 $PY -m fastpeft bench $bench_args --providers frozen cublas fastpeft \
        --dropout 0.1 --no-check --out "$name-$tag.json" 2>&1 | tee "$out/bench-$tag.log"
    rc_var=$((rc_var || PIPESTATUS[0]))
    copy_out
  done
fi

rc_pybench=0
if [ "${SKIP_PYTEST_BENCH:-0}" != 1 ]; then
  stamp pytest-benchmark
  bounded 600 $PY -m pytest bench -q -p no:cacheprovider --benchmark-json="$name-pytest-benchmark.json" 2>&1 | tee "$out/pytest-bench.log"
  rc_pybench=${PIPESTATUS[0]}
  copy_out
fi

stamp done
# TARGETS.md's ratios, PASS/MISS, from every result file of this run (informational: no exit code).
timeout 15 $PY -m fastpeft targets "$name"*.json >"$out/targets.txt" 2>&1; cat "$out/targets.txt"
grep -h -B3 "best config" "$out"/bench*.log >"$out/autotune-picks.txt" 2>/dev/null  # function, key, pick
echo "pip=$rc_pip gpu_tests=$rc_tests warm=$rc_warm bench=$rc_bench quant=$rc_quant variants=$rc_var pytest_bench=$rc_pybench" \
  | tee "$out/exit-codes.txt"
exit $((rc_pip || rc_tests || rc_bench || rc_quant || rc_var || rc_pybench))
