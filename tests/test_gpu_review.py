"""Found in the pre-GPU review (bench/aot_compile.py, sm90 with triton 3.6): what the interpreter forgives.

Each test here is CPU-only; the compiled facts behind them (shared memory per config) are in the
commit message and bench/aot_compile.py's output.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fastpeft.kernels import configs as C

ROOT = Path(__file__).resolve().parents[1]


def _cfg_tuple(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps


def test_down_pass_keeps_a_small_config_for_wide_ranks():
    """r > 64 (BLOCK_R = 128): compiled for sm90, every down config left for M ≤ 32 tokens (32×128×4 stages,
    16×256×4) needs 216–458 KB of shared memory (> the H200's 227 KB) with fp32 activations, or bf16 with
    dropout: each launch raised OutOfResources. The small-footprint config must survive the prune in both
    row regimes, and stay out of the autotuning of narrow ranks (one compile fewer per shape)."""
    gpu = C.down_configs(interpret=False)
    assert C.DOWN_WIDE_RANK in [_cfg_tuple(c) for c in gpu]
    for m_key in (1, 16, 32, 64, 8192):
        wide = [_cfg_tuple(c) for c in C.keep_for_down(gpu, {"M_KEY": m_key, "BLOCK_R": 128})]
        assert C.DOWN_WIDE_RANK in wide, m_key
        for block_r in (16, 32, 64):
            narrow = [_cfg_tuple(c) for c in C.keep_for_down(gpu, {"M_KEY": m_key, "BLOCK_R": block_r})]
            assert narrow and C.DOWN_WIDE_RANK not in narrow, (m_key, block_r)
    # the autotuner passes constexpr arguments as keyword arguments, the untuned launch in named_args
    assert C.DOWN_WIDE_RANK in [_cfg_tuple(c) for c in C.keep_for_down(gpu, {"M_KEY": 16}, BLOCK_R=128)]


def test_down_autotuners_use_the_down_prune():
    from fastpeft.kernels import lora_linear, lora_mixed

    for tuned in (lora_linear._down_tuned, lora_mixed._down_tuned):
        assert tuned.early_config_prune is C.keep_for_down


def test_worktree_on_pythonpath_takes_its_own_kernels(tmp_path):
    """fastpeft from PYTHONPATH (a git worktree) while an editable install of another checkout is on
    sys.meta_path: fastpeft.kernels must come from the same tree (it came from the installed checkout, so
    a worktree's kernel changes were silently not the ones tested)."""
    other = tmp_path / "other"
    tree = tmp_path / "tree"
    for dst in (other, tree):
        for name in ("fastpeft", "kernels"):
            shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    code = f"""
import importlib.abc, importlib.util, sys
sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]

class OtherCheckout(importlib.abc.MetaPathFinder):  # what setuptools' editable finder does, for 'other'
    def find_spec(self, name, path=None, target=None):
        if name == "fastpeft.kernels":
            init = {str(other / "kernels" / "__init__.py")!r}
            return importlib.util.spec_from_file_location(name, init,
                                                          submodule_search_locations=[{str(other / "kernels")!r}])
        return None

sys.meta_path.append(OtherCheckout())
sys.path.insert(0, {str(tree)!r})
import fastpeft, fastpeft.kernels as k
from fastpeft.kernels import lora_linear
print(fastpeft.__file__); print(k.__file__); print(lora_linear.__file__)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [Path(p) for p in proc.stdout.split()] == [tree / "fastpeft" / "__init__.py",
                                                       tree / "kernels" / "__init__.py",
                                                       tree / "kernels" / "lora_linear.py"]


def test_gpu_run_script_uses_python3_and_never_an_unbounded_timeout():
    """The device image's interpreter is ``python3`` (a bare python/pip/pytest may be missing there), and
    every long step is bounded by what is left of the call (``timeout 0`` would mean no limit)."""
    text = (ROOT / "bench" / "gpu_run.sh").read_text()
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    for line in code:
        assert not re.search(r"(^|[\s;(|])(python|pip|pytest)\s", re.sub(r"-m (pip|pytest)", "", line)), line
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_run.sh")]).returncode == 0
    # the helper: a step with no time left is skipped, not run with `timeout 0`
    helpers = text[text.index("t_start="):text.index("out=")]
    script = helpers + """
budget=45
bounded 600 echo ran; echo "rc=$?"
budget=200
FOO=bar bounded 5 bash -c 'echo "FOO=$FOO"'
"""
    env = {k: v for k, v in os.environ.items() if k != "BUDGET_S"}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60).stdout
    assert "skipped (out of time): echo ran" in out and "rc=124" in out
    assert "ran" not in out.replace("(out of time): echo ran", "")
    assert "FOO=bar" in out


def test_compile_only_warm_up_compiles_every_kernel_the_timed_run_looks_up(tmp_path):
    """bench/gpu_run.sh fills Triton's on-disk cache with `fastpeft bench --compile-only` processes in parallel,
    then times. Compiled for sm90 on CPU (bench/aot_compile.py's stand-in driver, the real harness, ops and
    launchers): after the warm-up, the timed run's autotuner path finds every kernel it looks up in the cache
    (the TMA configs' pre-hooks, which set the descriptors' block shapes, must run before each compile)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPEFT_AUTOTUNE")}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    args = "--preset tiny --modes fwd --providers fastpeft_bf16"
    found = []
    for mode in ("bench", "bench-tuned"):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "aot_compile.py"), "--only", mode, "--bench", args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        m = re.search(r"compiled (\d+) specializations .* failures: (\d+); new in the on-disk cache \(.*\): (\d+)",
                      proc.stdout)
        assert m, proc.stdout[-2000:]
        found.append(tuple(int(v) for v in m.groups()))
    (warm_n, warm_fail, warm_new), (tuned_n, tuned_fail, tuned_new) = found
    assert warm_fail == tuned_fail == 0
    assert warm_n == warm_new > 1  # every autotune config of each launch compiled, not only the first
    assert tuned_n == warm_n and tuned_new == 0  # ... and nothing left for the timed run to compile


def test_shard_option_splits_the_selected_tests_into_disjoint_slices():
    """pytest --shard I/N (tests/conftest.py): bench/gpu_run.sh runs the gpu tests in N parallel processes."""
    target = "tests/test_targets.py"

    def collect(*extra):
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               target, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
        return proc, [line for line in proc.stdout.splitlines() if "::" in line]

    _, everything = collect()
    assert len(everything) >= 3
    slices = [collect("--shard", f"{i}/3")[1] for i in range(3)]
    assert all(slices) and sum(slices, []) == everything  # contiguous, disjoint, complete, in order
    proc, _ = collect("--shard", "3/3")
    assert proc.returncode != 0 and "0..N-1" in proc.stderr + proc.stdout


def test_bench_compile_only_runs_each_step_once_and_writes_no_result(tmp_path):
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "FASTPEFT_AUTOTUNE"}
    proc = subprocess.run([sys.executable, "-m", "fastpeft", "bench", "--preset", "tiny", "--device", "cpu",
                           "--providers", "fastpeft", "--compile-only", "--out", str(out)], cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compile-only: 3 rows ran once, untimed" in proc.stdout and not out.exists()


def test_time_step_in_compile_only_mode_calls_the_step_once(monkeypatch):
    import torch

    from fastpeft import benchmarking as BM

    calls = []
    monkeypatch.setattr(BM, "_COMPILE_ONLY", True)
    row = BM.time_step(lambda: calls.append(1), torch.device("cpu"))
    assert calls == [1] and row["timer"] == "compile-only" and row["ms"] != row["ms"]  # NaN
    assert BM._peak_bytes(lambda: calls.append(1), torch.device("cpu")) is None and calls == [1]
