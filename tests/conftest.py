"""Test setup: without CUDA, Triton kernels run in the CPU interpreter.

``TRITON_INTERPRET=1`` must be set before Triton decorates the kernels, i.e.
before ``fastpeft`` is imported, so it is set here at collection time.
Kernel tests pick the backend explicitly with the ``backend`` fixture: under
``auto`` a CPU run would silently test the PyTorch path against itself.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


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
