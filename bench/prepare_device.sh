#!/usr/bin/env bash
# Run here (with network), once, before the GPU call: the device machine reaches no registry and
# has no bitsandbytes. This unpacks bitsandbytes 0.50.2 (it ships a CUDA 13.0 library, matching
# the device's torch 2.11+cu130) into .whl/site, keeping only the CUDA 13 and CPU libraries so the
# carried tree stays far under the 64 MiB limit, and peft 0.21.2 beside it. gpu_run.sh puts .whl/site on PYTHONPATH.
#   bash bench/prepare_device.sh
#   run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=600)
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir -p .whl/dl .whl/site
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d .whl/dl "bitsandbytes==${BNB_VERSION:-0.50.2}"
python3 - <<'PY'
import glob, zipfile
whl = glob.glob(".whl/dl/bitsandbytes-*.whl")[0]
keep = ("_cuda130", "_cuda132", "_cpu")
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.endswith(".so") and not any(k in name for k in keep):
            continue  # other CUDA/ROCm builds: not loadable on the device anyway
        z.extract(name, ".whl/site")
PY
# peft, pinned to the version the suite is written against (pure Python; the device image's own peft may be
# another version, whose behaviour the peft-comparing gpu tests would then measure instead)
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl/dl "peft==${PEFT_VERSION:-0.21.2}"
python3 -c 'import glob, zipfile; zipfile.ZipFile(glob.glob(".whl/dl/peft-*.whl")[0]).extractall(".whl/site")'
rm -rf .whl/dl
du -sh .whl
