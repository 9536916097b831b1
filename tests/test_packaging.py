"""Packaging: ``kernels/`` is ``fastpeft.kernels`` installed or not, and never shadows HF's ``kernels``."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_checkout_without_install_maps_kernels(tmp_path):
    # PYTHONPATH=<checkout> with no install (the GPU machine's fallback). A copy of the checkout, so that
    # whatever fastpeft is installed here (an editable finder pointing at this repository) cannot answer.
    checkout = tmp_path / "checkout"
    for name in ("fastpeft", "kernels"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = _run(f"""
import sys
sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]
sys.path.insert(0, {str(checkout)!r})
import fastpeft, fastpeft.kernels as k
from fastpeft.kernels import lora_mixed
import fastpeft.ops_mixed
print(fastpeft.__file__); print(k.__file__); print(lora_mixed.__file__)
""", tmp_path)
    assert [Path(p) for p in out.split()] == [checkout / "fastpeft" / "__init__.py", checkout / "kernels" /
                                               "__init__.py", checkout / "kernels" / "lora_mixed.py"]


def test_repo_root_does_not_shadow_hf_kernels():
    # From the repository root, cwd is on sys.path and kernels/ would pose as HF's ``kernels`` package,
    # which transformers probes on import: it must read as "not installed".
    out = _run("""
import kernels
print(hasattr(kernels, '__file__'), getattr(kernels, '__all__', None))
import transformers.utils.import_utils as iu
import fastpeft
print('ok')
""", ROOT)
    assert out.split() == ["False", "[]", "ok"]


def _undocumented(module) -> list[str]:
    """Public functions/classes of ``module.__all__`` without a docstring, and the public methods and
    properties those classes define themselves (inherited ones are checked where they are defined)."""
    import inspect

    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if not inspect.isclass(obj) or not obj.__module__.startswith("fastpeft"):
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_"):
                continue
            func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            func = func.fget if isinstance(func, property) else func
            if inspect.isfunction(func) and not func.__doc__:
                missing.append(f"{name}.{attr}")
    return missing


def test_every_public_name_has_a_docstring():
    import fastpeft
    import fastpeft.methods

    assert _undocumented(fastpeft) == [] and _undocumented(fastpeft.methods) == []
