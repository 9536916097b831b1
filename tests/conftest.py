"""Test setup: without CUDA, Triton kernels run in the CPU interpreter.

``TRITON_INTERPRET=1`` must be set before Triton decorates the kernels, i.e.
before ``fastpeft`` is imported, so it is set here at collection time.
Kernel tests pick the backend explicitly with the ``backend`` fixture: under
``auto`` a CPU run would silently test the PyTorch path against itself.

Two kinds of kernel tests, never both in one process:
- interpreter tests (marker ``interp``, or the ``triton`` side of the backend
  fixtures) launch kernels on CPU tensors: they need ``TRITON_INTERPRET=1``,
  which is set by default on a machine without CUDA;
- ``gpu`` tests launch compiled kernels on CUDA tensors: they need CUDA and no
  interpreter. On a GPU machine ``pytest`` runs these (and the PyTorch-path
  tests); ``TRITON_INTERPRET=1 pytest`` runs the interpreter ones there.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _needs_interpreter(item) -> bool:
    if "interp" in item.keywords:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "triton_backend" in item.fixturenames or "triton" in (params.get("backend"), params.get("backend_name"))


def pytest_configure(config):
    config.addinivalue_line("markers", "interp: launches Triton kernels on CPU tensors (needs TRITON_INTERPRET=1)")


def pytest_addoption(parser):
    parser.addoption("--shard", metavar="I/N", default=None,
                     help="run only slice I (0-based) of N contiguous slices of the selected tests, so N processes "
                          "run a suite in parallel (bench/gpu_run.sh: the gpu tests, compiling side by side)")


def _shard(spec: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard takes I/N (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise pytest.UsageError(f"--shard {spec}: I must be in 0..N-1")
    return i, n


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected: the slices split what is left
def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if spec:
        i, n = _shard(spec)
        # Contiguous slices keep a file's neighbouring parametrizations (same kernels, same specializations)
        # in one process, so parallel shards rarely compile the same kernel twice.
        lo, hi = i * len(items) // n, (i + 1) * len(items) // n
        dropped = items[:lo] + items[hi:]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = items[lo:hi]
    no_gpu = pytest.mark.skip(reason="needs a CUDA device and compiled kernels (TRITON_INTERPRET unset)")
    no_interp = pytest.mark.skip(reason="kernels on CPU tensors need TRITON_INTERPRET=1 (set it to run these here)")
    for item in items:
        if "gpu" in item.keywords and (not HAS_CUDA or INTERPRET):
            item.add_marker(no_gpu)
        elif "gpu" not in item.keywords and _needs_interpreter(item) and not INTERPRET:
            item.add_marker(no_interp)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test once per backend (``triton`` = the kernels, interpreted on CPU)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", request.param)
    return request.param


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    return "triton"


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    return "torch"
