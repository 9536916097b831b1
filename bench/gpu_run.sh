#!/usr/bin/env bash
# One GPU session: install, GPU tests, the canonical layer benchmark, the pytest-benchmark suite.
# Every step runs even if an earlier one fails; exit codes go to exit-codes.txt. Results land in
# bench/results/ (to commit) and are copied to $OUT (the only folder the device tool brings back).
#   bash bench/gpu_run.sh                              # from the repository root, or anywhere
#   BENCH_ARGS="--preset tiny" bash bench/gpu_run.sh   # other `fastpeft bench` arguments (a dry run on CPU)
set -u
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-bench/results}"
mkdir -p "$out" bench/results
device=$(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' \
         | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-*$//')
name="bench/results/${device}-$(date -u +%Y%m%dT%H%M%SZ)"

# No internet on the GPU box: no build isolation, no dependency resolution.
pip install --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1; rc_pip=$?
for wheel in shared/wheels/bitsandbytes-*.whl; do
  [ -e "$wheel" ] && pip install --no-deps "$wheel" >>"$out/pip.log" 2>&1
done

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
pytest -m gpu tests -x -q -p no:cacheprovider --junitxml="$out/junit-gpu.xml" 2>&1 | tee "$out/pytest-gpu.log"
rc_tests=${PIPESTATUS[0]}

# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
fastpeft bench ${BENCH_ARGS:---preset layer} --out "$name.json" --plot "$name.png" 2>&1 | tee "$out/bench.log"
rc_bench=${PIPESTATUS[0]}

pytest bench -q -p no:cacheprovider --benchmark-json="$name-pytest-benchmark.json" 2>&1 | tee "$out/pytest-bench.log"
rc_pybench=${PIPESTATUS[0]}

echo "pip=$rc_pip gpu_tests=$rc_tests bench=$rc_bench pytest_bench=$rc_pybench" | tee "$out/exit-codes.txt"
[ "$(realpath "$out")" = "$(realpath bench/results)" ] || cp "$name"* "$out/" 2>/dev/null
exit $((rc_pip || rc_tests || rc_bench || rc_pybench))
