"""pytest-benchmark suite for mixed-adapter batches (issue 9), driven by ``fastpeft.benchmarking.run_mixed``.

    pytest bench/test_bench_mixed.py --benchmark-json=bench/results/<device>-<date>-mixed.json

1, 4, 16 and 64 adapters × 512 tokens on 4096×4096 and 4096×14336 (CUDA; the tiny CPU grid
elsewhere): fastpeft mixed vs fastpeft single-adapter vs peft ``adapter_names`` vs the frozen base,
fwd and fwd+bwd, all from one run so the ratios share a device. The layer times are the harness
rows in ``extra_info`` (CUDA events via ``triton.testing.do_bench`` on a GPU).
"""

import pytest
import torch

from fastpeft import benchmarking

pytest.importorskip("pytest_benchmark")

pytestmark = pytest.mark.benchmark(group="lora-mixed")
PRESET = "mixed" if torch.cuda.is_available() else "mixed-tiny"


@pytest.mark.parametrize("mode", benchmarking.MODES)
def test_mixed(benchmark, mode: str) -> None:
    rows = benchmark.pedantic(benchmarking.run_mixed, args=(PRESET,), kwargs={"modes": [mode]}, rounds=1,
                              iterations=1)
    benchmark.extra_info["rows"] = rows
    assert rows and all(r["ms"] > 0 for r in rows)
    failed = [(r["shape"], r["adapters"], r.get("check_errors")) for r in rows if r.get("check_ok") is False]
    assert not failed, f"mixed outputs differ from peft's: {failed}"
