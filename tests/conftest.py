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


def pytest_collection_modifyitems(config, items):
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
