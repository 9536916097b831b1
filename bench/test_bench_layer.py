"""pytest-benchmark suite for the LoRA layer, driven by ``fastpeft.benchmarking``.

    pytest bench --benchmark-json=bench/results/<device>-<date>-pytest-benchmark.json

Not part of the main suite: ``pytest`` collects only ``tests/`` (pyproject's
``testpaths``), and ``-m "not benchmark"`` deselects these anywhere. Each test
runs one provider and one mode over the preset's cells (TARGETS.md's
canonical cells on CUDA, the tiny CPU preset elsewhere), with ``frozen``
beside it so its ratio comes from the same run. pytest-benchmark's own
timing here is the whole harness call; the layer times are the harness rows
in ``extra_info`` (CUDA events via ``triton.testing.do_bench`` on a GPU,
since a wall clock around asynchronous kernels lies).
"""

import pytest
import torch

from fastpeft import benchmarking

pytest.importorskip("pytest_benchmark")

pytestmark = pytest.mark.benchmark(group="lora-layer")
PRESET = "layer" if torch.cuda.is_available() else "tiny"


@pytest.mark.parametrize("mode", benchmarking.MODES)
@pytest.mark.parametrize("provider", benchmarking.PROVIDERS)
def test_layer(benchmark, provider: str, mode: str) -> None:
    providers = list(dict.fromkeys(["frozen", provider]))
    rows = benchmark.pedantic(benchmarking.run, args=(PRESET,), kwargs={"providers": providers, "modes": [mode]},
                              rounds=1, iterations=1)
    benchmark.extra_info["rows"] = [r for r in rows if r["provider"] == provider]
    assert rows and all(r["ms"] > 0 for r in rows)
    failed = [(r["shape"], r["tokens"], r["dropout"], r.get("check_errors")) for r in rows
              if benchmarking.row_ok(r) is False]
    assert not failed, f"gradients wrong or zero: {failed}"
