"""The one benchmark harness behind ``fastpeft bench`` and ``bench/test_bench_layer.py``.

A *cell* is a named shape (in × out) and a token count N. For every cell the
harness builds each provider from the same frozen base weight and the same
adapter weights (so the LoRA providers compute the same function), then
measures each mode:

* ``fwd`` — inference with an unmerged adapter: eval mode, no grad;
* ``fwdbwd`` — train-mode forward with dropout p, then the backward of a fixed
  random ``dy`` into ``x`` (which requires grad) and the adapter weights.

Providers: ``frozen`` (``nn.Linear``, weight frozen: the floor), ``cublas``
(``torch.mm`` alone: ``x Wᵀ``, and for fwdbwd also ``dy W``; cuBLAS on CUDA,
so our GEMM can be quoted against it), ``peft`` (peft's LoRA with its default
fp32 adapters), ``peft_bf16`` (peft with adapters in the base dtype), and
``fastpeft`` / ``fastpeft_bf16`` (``FastLoraLinear`` likewise). DoRA rows
(presets ``dora-tiny`` / ``dora``, or asked for by name): ``peft_dora`` and
``fastpeft_dora`` (``use_dora=True``, fp32 adapters, the same magnitude in both,
checked against each other with the magnitude's gradient ``dM`` too; their
``vs_peft`` is against ``peft_dora``).

Each row records the timing (``do_bench`` on CUDA, a wall clock on CPU), the
bytes autograd saves for backward (one layer, and three layers sharing one
input as q/k/v do), the peak memory on CUDA, and a gradient check: fastpeft
against peft at p=0 (outputs, dx, dA, dB), so a fast wrong kernel is flagged.

Example::

    from fastpeft import benchmarking
    rows = benchmarking.run("tiny")
    print(benchmarking.format_table(rows))
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import platform
import shlex
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fastpeft import FastLoraLinear, __version__, backend_for

SHAPES: dict[str, tuple[int, int]] = {
    "4096x4096": (4096, 4096),  # attention projection (Llama-7B/Mistral hidden size)
    "4096x14336": (4096, 14336),  # Mistral-7B MLP up/gate
    "14336x4096": (14336, 4096),  # Mistral-7B MLP down
    "64x96": (64, 96),  # CPU smoke size: runs in milliseconds
}
PROVIDERS = ("frozen", "cublas", "peft", "peft_bf16", "fastpeft", "fastpeft_bf16")
DORA_PROVIDERS = ("peft_dora", "fastpeft_dora")
LAYER_PROVIDERS = PROVIDERS + DORA_PROVIDERS  # what the layer presets accept (PROVIDERS: their default)
MODES = ("fwd", "fwdbwd")
# Relative-norm tolerance of the fastpeft-vs-peft check, by activation dtype: twice
# DESIGN.md's bound against an exact reference, since both sides round independently.
CHECK_TOL = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 2e-2}
_CHECKED_AGAINST = {"fastpeft": "peft", "fastpeft_bf16": "peft_bf16", "fastpeft_dora": "peft_dora"}
_PEFT_BASELINE = {"peft_dora": "peft_dora", "fastpeft_dora": "peft_dora"}  # vs_peft's row; "peft" otherwise
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Preset:
    """A benchmark grid: (shape name, tokens) cells × dropouts × providers × modes."""

    cells: tuple[tuple[str, int], ...]
    dropouts: tuple[float, ...] = (0.1, 0.0)
    providers: tuple[str, ...] = PROVIDERS
    modes: tuple[str, ...] = MODES
    dtype: str = "bf16"


PRESETS: dict[str, Preset] = {
    "tiny": Preset(cells=(("64x96", 48),)),
    # TARGETS.md's canonical layer cells.
    "layer": Preset(cells=(("4096x4096", 8192), ("4096x4096", 2048), ("4096x14336", 8192), ("14336x4096", 8192))),
}
_DORA_ROWS = ("frozen", "peft", "fastpeft", *DORA_PROVIDERS)
PRESETS["dora-tiny"] = Preset(cells=PRESETS["tiny"].cells, providers=_DORA_ROWS)
PRESETS["dora"] = Preset(cells=(("4096x4096", 8192), ("4096x14336", 8192)), providers=_DORA_ROWS)


@dataclass(frozen=True)
class LayerSpec:
    """What every provider of one row is built with."""

    r: int
    lora_alpha: float
    dropout: float
    use_dora: bool = False


@dataclass
class Case:
    """One provider, built: ``module`` maps x to y (``None`` for the bare GEMM, which uses ``gemm_weight``)."""

    module: nn.Module | None
    adapters: list[Tensor]  # the trainable tensors fwdbwd differentiates, besides x
    adapter_dtype: str | None
    gemm_weight: Tensor | None = None


# ------------------------------------------------------------------ providers
def _frozen(spec: LayerSpec, base: nn.Linear, A: Tensor, B: Tensor) -> Case:
    layer = copy.deepcopy(base).requires_grad_(False)
    return Case(layer, [], None)


def _cublas(spec: LayerSpec, base: nn.Linear, A: Tensor, B: Tensor) -> Case:
    return Case(None, [], None, gemm_weight=base.weight.detach())


def _peft(spec: LayerSpec, base: nn.Linear, A: Tensor, B: Tensor, fp32_adapters: bool) -> Case:
    import peft  # optional: only the peft providers and the check need it

    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.dropout,
                             target_modules=["0"], init_lora_weights=False, use_dora=spec.use_dora)
    # The smallest model peft injects into: the Linear as module "0" of a Sequential.
    model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), config, autocast_adapter_dtype=fp32_adapters)
    # Time peft's LoRA layer itself, not PeftModel.forward's kwargs plumbing around it.
    layer = model.base_model.model[0]
    return Case(layer, _load_adapters(layer, A, B), _dtype_name(layer.lora_A["default"].weight.dtype))


def _fastpeft(spec: LayerSpec, base: nn.Linear, A: Tensor, B: Tensor, fp32_adapters: bool) -> Case:
    layer = FastLoraLinear.from_linear(copy.deepcopy(base), r=spec.r, lora_alpha=spec.lora_alpha,
                                       lora_dropout=spec.dropout, init_lora_weights=False,
                                       autocast_adapter_dtype=fp32_adapters, use_dora=spec.use_dora)
    return Case(layer, _load_adapters(layer, A, B), _dtype_name(layer.lora_A["default"].weight.dtype))


@torch.no_grad()
def _load_adapters(layer: nn.Module, A: Tensor, B: Tensor) -> list[Tensor]:
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a.copy_(A)
    b.copy_(B)
    if "default" not in getattr(layer, "lora_magnitude_vector", {}):
        return [a, b]
    # DoRA: the same magnitude in every provider, off ‖W0 + sBA‖ by a few % per row (so k ≠ 1 matters)
    m = layer.lora_magnitude_vector["default"].weight
    w = layer.get_base_layer().weight.float()
    norm = torch.linalg.vector_norm(w + layer.scaling["default"] * (B.float() @ A.float()), dim=1)
    m.copy_(norm * (1 + 0.05 * torch.cos(torch.arange(norm.numel(), device=norm.device))))
    return [a, b, m]


BUILDERS: dict[str, Callable[[LayerSpec, nn.Linear, Tensor, Tensor], Case]] = {
    "frozen": _frozen,
    "cublas": _cublas,
    "peft": lambda *a: _peft(*a, fp32_adapters=True),
    "peft_bf16": lambda *a: _peft(*a, fp32_adapters=False),
    "fastpeft": lambda *a: _fastpeft(*a, fp32_adapters=True),
    "fastpeft_bf16": lambda *a: _fastpeft(*a, fp32_adapters=False),
    "peft_dora": lambda spec, *a: _peft(_dora(spec), *a, fp32_adapters=True),
    "fastpeft_dora": lambda spec, *a: _fastpeft(_dora(spec), *a, fp32_adapters=True),
}


def _dora(spec: LayerSpec) -> LayerSpec:
    return LayerSpec(spec.r, spec.lora_alpha, spec.dropout, use_dora=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype))


# ------------------------------------------------------------------- measures
class _Saved:
    """One tensor as autograd holds it between the counter's pack and unpack hooks (weakly referenced by the
    counter: it lives exactly as long as the graph node that saved it)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


class SavedTensorCounter:
    """Bytes autograd keeps for backward from a ``with`` block, each storage once: what the graphs still
    alive at the end of the block hold (a graph built and dropped inside it, e.g. peft's DoRA weight norm
    through ``lora_B(lora_A(eye))``, keeps nothing for backward and is not counted).

    Tensors whose storage is one of ``exclude``'s (the parameters) are not
    counted. The count is taken when the block ends, every counted storage
    alive then (so no freed address can be mistaken for another tensor's).

    Example::

        with SavedTensorCounter(exclude=layer.parameters()) as saved:
            y = layer(x)
        saved.nbytes
    """

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._saved: weakref.WeakSet[_Saved] = weakref.WeakSet()
        self._nbytes: int | None = None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor)

    def _pack(self, t: Tensor) -> _Saved:
        # t.detach(): the same storage without t's grad_fn. Holding t itself would tie a saved output to its
        # own graph node (output → grad_fn → _Saved → output), a cycle through C++ no collector frees.
        saved = _Saved(t.detach())
        self._saved.add(saved)
        return saved

    def _count(self) -> int:
        storages: dict[int, int] = {}
        for saved in list(self._saved):
            storage = saved.tensor.untyped_storage()
            if storage.data_ptr() not in self._excluded:
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def __enter__(self) -> SavedTensorCounter:
        self._nbytes = None
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._nbytes = self._count()

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct storages saved for backward (each counted once) by graphs still alive: as
        counted when the block ended (inside the block: those held now)."""
        return self._count() if self._nbytes is None else self._nbytes


def relative_error(ours: Tensor, ref: Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖ in fp64; ``inf`` where either side is not finite (NaN never passes)."""
    ref64 = ref.detach().double()
    diff = (ours.detach().double() - ref64).norm().item()
    norm = ref64.norm().item()
    err = diff / norm if norm > 0 else diff
    return err if math.isfinite(err) else math.inf


def grads_usable(grads: dict[str, Tensor]) -> bool:
    """Every tensor finite and not all zero (a zero gradient makes any comparison vacuous)."""
    return all(bool(torch.isfinite(g).all()) and bool(g.any()) for g in grads.values())


def compare_grads(ours: dict[str, Tensor], ref: dict[str, Tensor], tol: float) -> dict:
    """Row fields of a check: per-tensor relative errors, the tolerance, and the verdict."""
    errors = {k: relative_error(ours[k], ref[k]) for k in ref}
    ok = grads_usable(ours) and all(e <= tol for e in errors.values())
    return {"check_errors": errors, "check_tol": tol, "check_ok": ok}


def _forward_backward(case: Case, x: Tensor, dy: Tensor) -> tuple[int, dict[str, Tensor]]:
    """One train-mode fwd+bwd: (saved bytes, {"y", "dx", "dA", "dB"} and "dM", DoRA's magnitude)."""
    case.module.train()
    with SavedTensorCounter(exclude=case.module.parameters()) as saved:
        y = case.module(x)
    grads = torch.autograd.grad(y, [x, *case.adapters], dy)
    return saved.nbytes, dict(zip(("y", "dx", "dA", "dB", "dM"), (y.detach(), *grads)))


def _step(case: Case, mode: str, x: Tensor, dy: Tensor) -> Callable[[], None]:
    """The closure that gets timed."""
    if case.module is None:
        w, x2 = case.gemm_weight, x.detach()
        if mode == "fwd":
            return lambda: torch.mm(x2, w.t())
        return lambda: (torch.mm(x2, w.t()), torch.mm(dy, w))  # the two GEMMs a frozen layer runs
    module = case.module.train(mode == "fwdbwd")
    if mode == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                module(x)
        return fwd
    inputs = [x, *case.adapters]
    # autograd.grad rather than .backward(): no .grad accumulation kernels in the timing.
    return lambda: torch.autograd.grad(module(x), inputs, dy)


# ``fastpeft bench --compile-only``: every step runs once, untimed (see ``compile_only``).
_COMPILE_ONLY = False


def compile_only(on: bool | None = None) -> bool:
    """Whether the harness only warms Triton's kernel cache; ``compile_only(True)`` turns it on.

    On, every timed step runs exactly once and untimed (``time_step`` returns NaN timings), peak memory is
    not measured, and ``FASTPEFT_AUTOTUNE=warm`` makes each kernel launch compile every config the
    autotuner would time. Several such processes run side by side (one per preset or cell) fill the
    on-disk cache in parallel, so the timed run that follows compiles nothing (``bench/gpu_run.sh``).
    """
    global _COMPILE_ONLY
    if on is not None:
        _COMPILE_ONLY = bool(on)
        if on:
            import os

            os.environ["FASTPEFT_AUTOTUNE"] = "warm"
    return _COMPILE_ONLY


def triton_cache_entries() -> int | None:
    """How many compiled kernels Triton's on-disk cache holds (``None`` when it cannot be read)."""
    try:
        from triton import knobs

        root = Path(knobs.cache.dir)
    except Exception:
        return None
    if not root.is_dir():
        return 0
    return sum(1 for _ in root.glob("*/__grp__*.json"))


def time_step(step: Callable[[], object], device: torch.device, warmup_ms: float = 25,
              rep_ms: float = 120) -> dict:
    """Median and p20/p80 of ``step`` in ms, plus the raw samples.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each
    call), since a wall clock around asynchronous kernels lies. Elsewhere: a
    wall clock over as many calls as fit in ``rep_ms`` (5 to 50).
    """
    if _COMPILE_ONLY:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        nan = float("nan")
        return {"timer": "compile-only", "ms": nan, "ms_p20": nan, "ms_p80": nan, "times_ms": []}
    if device.type == "cuda":
        from triton.testing import do_bench

        times, timer = do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="all"), "do_bench"
    else:
        step()
        step()
        times, start, timer = [], time.perf_counter(), "wall"
        while len(times) < 5 or (len(times) < 50 and time.perf_counter() - start < rep_ms / 1e3):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    p20, p50, p80 = np.quantile(np.asarray(times, dtype=np.float64), [0.2, 0.5, 0.8]).tolist()
    return {"timer": timer, "ms": p50, "ms_p20": p20, "ms_p80": p80, "times_ms": [round(t, 4) for t in times]}


def _peak_bytes(step: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda" or _COMPILE_ONLY:
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# ------------------------------------------------------------------------ run
def parse_shape(name: str) -> tuple[int, int]:
    """``"4096x14336"`` (or any key of ``SHAPES``) → (in_features, out_features)."""
    if name in SHAPES:
        return SHAPES[name]
    try:
        a, b = (int(v) for v in name.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {name!r} is neither one of {list(SHAPES)} nor IN x OUT like 512x768") from None
    return a, b


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; any other name as ``torch.device`` reads it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Device, versions and the exact command, copied into every row."""
    versions = {"torch": torch.__version__, "fastpeft": __version__, "cuda": torch.version.cuda}
    # Versions from package metadata: importing bitsandbytes just to read its version has side effects.
    for name in ("triton", "peft", "bitsandbytes", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()})"
    return {"device": name, "versions": versions, "command": shlex.join(sys.argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "fastpeft_backend": backend_for(torch.empty(0, device=device, dtype=dtype))}


def _cells(preset: Preset, shapes: Sequence[str] | None, tokens: Sequence[int] | None) -> list[tuple[str, int]]:
    if shapes is None and tokens is None:
        return list(preset.cells)
    shapes = list(shapes) if shapes else list(dict.fromkeys(s for s, _ in preset.cells))
    tokens = list(tokens) if tokens else list(dict.fromkeys(n for _, n in preset.cells))
    return [(s, n) for s in shapes for n in tokens]


def _providers(requested: Sequence[str] | None, known: Sequence[str], where: str = "") -> list[str]:
    """The providers to measure: ``requested`` checked against ``known``, or by default all of ``known``
    with peft's rows only where peft is installed (it is optional)."""
    if requested is None:
        has_peft = importlib.util.find_spec("peft") is not None
        return [p for p in known if has_peft or not p.startswith("peft")]
    if set(requested) - set(known):
        raise ValueError(f"unknown {sorted(set(requested) - set(known))}{where}; choose from {tuple(known)}")
    return list(requested)


def run(preset: str = "tiny", shapes: Sequence[str] | None = None, tokens: Sequence[int] | None = None,
        providers: Sequence[str] | None = None, modes: Sequence[str] | None = None,
        dropouts: Sequence[float] | None = None, dtype: str | None = None, device: str | torch.device = "auto",
        r: int = 16, lora_alpha: float = 32, check: bool = True, warmup_ms: float = 25, rep_ms: float = 120,
        seed: int = 0) -> list[dict]:
    """Benchmark a preset (optionally narrowed) and return one dict per measured row.

    ``shapes``/``tokens`` given replace the preset's cells by their product.
    ``frozen`` and ``cublas`` do not depend on dropout and ``fwd`` runs in eval
    mode, so those rows are measured once per cell with ``dropout`` ``None``.
    """
    grid = PRESETS[preset]
    # the preset's providers by default; any of LAYER_PROVIDERS when asked for (checked below with the modes)
    providers = tuple(_providers(None, grid.providers) if providers is None else providers)
    modes = tuple(modes or grid.modes)
    dropouts = tuple(grid.dropouts if dropouts is None else dropouts)
    for given, known in ((providers, LAYER_PROVIDERS), (modes, MODES)):
        if set(given) - set(known):
            raise ValueError(f"unknown {sorted(set(given) - set(known))}; choose from {known}")
    dev, dt = resolve_device(device), _DTYPES[dtype or grid.dtype]
    env = environment(dev, dt)
    rows: list[dict] = []
    for shape, n in _cells(grid, shapes, tokens):
        in_f, out_f = parse_shape(shape)
        g = torch.Generator(dev).manual_seed(seed)
        base = nn.Linear(in_f, out_f, bias=False, device=dev, dtype=dt)
        with torch.no_grad():
            base.weight.copy_(torch.randn(out_f, in_f, generator=g, device=dev) * in_f**-0.5)
        # nn.Linear's default init ranges, as peft's init_lora_weights=False leaves them: B ≠ 0.
        A = (torch.rand(r, in_f, generator=g, device=dev) * 2 - 1) * in_f**-0.5
        B = (torch.rand(out_f, r, generator=g, device=dev) * 2 - 1) * r**-0.5
        x = torch.randn(n, in_f, generator=g, device=dev).to(dt).requires_grad_()
        dy = torch.randn(n, out_f, generator=g, device=dev).to(dt)
        cell = {"shape": shape, "in_features": in_f, "out_features": out_f, "tokens": n, "dtype": _dtype_name(dt),
                "r": r, "lora_alpha": lora_alpha, "x_bytes": x.numel() * x.element_size()}
        checks = {}
        if check and "fwdbwd" in modes:
            checks = {p: _check(p, LayerSpec(r, lora_alpha, 0.0), base, A, B, x, dy, dt)
                      for p in providers if p in _CHECKED_AGAINST}
        for mode in modes:
            for p in dropouts if mode == "fwdbwd" else (None,):
                for provider in providers:
                    if p is not None and p != dropouts[0] and provider in ("frozen", "cublas"):
                        continue
                    row = {**env, **cell, "provider": provider, "mode": mode}
                    row["dropout"] = None if provider in ("frozen", "cublas") else p
                    spec = LayerSpec(r, lora_alpha, p or 0.0)
                    row.update(_measure(provider, spec, mode, base, A, B, x, dy, dev, warmup_ms, rep_ms))
                    if mode == "fwdbwd":
                        row.update(checks.get(provider, {}))
                    rows.append(row)
    add_ratios(rows)
    return rows


def _kernel_launches() -> dict[str, int]:
    """fastpeft's per-kernel launch counters (empty without Triton)."""
    try:
        from fastpeft.kernels import LAUNCHES
    except ImportError:
        return {}
    return dict(LAUNCHES)


def _measure(provider: str, spec: LayerSpec, mode: str, base: nn.Linear, A: Tensor, B: Tensor, x: Tensor,
             dy: Tensor, device: torch.device, warmup_ms: float, rep_ms: float) -> dict:
    """One row's numbers, plus which fastpeft kernels ran for one call of the timed step (so a
    silent fallback — TMA GEMM to pointer, Triton to PyTorch — shows in the record)."""
    build = BUILDERS[provider]
    case = build(spec, base, A, B)
    out: dict = {"adapter_dtype": case.adapter_dtype}
    if mode == "fwdbwd" and case.module is not None:
        out["saved_bytes"], grads = _forward_backward(case, x, dy)
        out["grads_ok"] = grads_usable({k: v for k, v in grads.items() if k != "y"})
        del grads  # dx is as large as x: keep it out of the timing's memory
        # q/k/v: three layers (own weights, own dropout masks) reading one x, counted together.
        layers = [case.module, *(build(spec, base, A, B).module for _ in range(2))]
        with SavedTensorCounter(exclude=[t for m in layers for t in m.parameters()]) as saved:
            ys = [m.train()(x) for m in layers]
        out["saved_bytes_qkv"] = saved.nbytes
        del ys, saved, layers
    step = _step(case, mode, x, dy)
    before = _kernel_launches()
    step()
    after = _kernel_launches()
    out["kernels_per_step"] = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    out.update(time_step(step, device, warmup_ms, rep_ms))
    out["peak_bytes"] = _peak_bytes(step, device)
    return out


def _check(provider: str, spec: LayerSpec, base: nn.Linear, A: Tensor, B: Tensor, x: Tensor, dy: Tensor,
           dtype: torch.dtype) -> dict:
    """fastpeft vs its peft twin at p=0 (peft's dropout masks come from another stream)."""
    reference = _CHECKED_AGAINST[provider]
    try:
        _, ref = _forward_backward(BUILDERS[reference](spec, base, A, B), x, dy)
    except ImportError:
        return {"check_ok": None, "check_note": f"{reference} not importable"}
    _, ours = _forward_backward(BUILDERS[provider](spec, base, A, B), x, dy)
    return {**compare_grads(ours, ref, CHECK_TOL[dtype]), "check_against": f"{reference} p=0"}


def add_ratios(rows: list[dict]) -> None:
    """Set ``vs_frozen`` (time / frozen's, same cell and mode) and ``vs_peft`` (/ peft's, same dropout too; DoRA
    rows / ``peft_dora``'s)."""
    def key(r: dict, *extra: str) -> tuple:
        return (r["shape"], r["tokens"], r["mode"], *(r[k] for k in extra))

    frozen = {key(r): r["ms"] for r in rows if r["provider"] == "frozen"}
    peft = {(r["provider"], *key(r, "dropout")): r["ms"] for r in rows if r["provider"] in ("peft", "peft_dora")}
    for r in rows:
        baseline = (_PEFT_BASELINE.get(r["provider"], "peft"), *key(r, "dropout"))
        r["vs_frozen"] = r["ms"] / frozen[key(r)] if key(r) in frozen else None
        r["vs_peft"] = r["ms"] / peft[baseline] if baseline in peft else None


def row_ok(row: dict) -> bool | None:
    """False if the row's gradient check or its gradients failed, True if one passed, None if neither ran."""
    verdicts = [row.get("check_ok"), row.get("grads_ok")]
    if False in verdicts:
        return False
    return True if True in verdicts else None


# --------------------------------------------------------------------- output
def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no inf/NaN
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(rows: list[dict], path: str | Path) -> Path:
    """Write ``{"schema": 1, "rows": rows}``: strict JSON, one row a line (diffable, and the raw
    timings stay compact); parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(_json_safe(r), allow_nan=False) for r in rows)
    path.write_text(f'{{"schema": 1, "rows": [\n{lines}\n]}}\n')
    return path


def load_json(path: str | Path) -> list[dict]:
    """The rows of a results file written by ``write_json``."""
    return json.loads(Path(path).read_text())["rows"]


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table: one line per row, ratios within the run, then device and versions."""
    head = ("shape", "N", "mode", "p", "provider", "adapters", "ms", "p20–p80", "×frozen", "×peft",
            "saved×x", "qkv×x", "peak+MiB", "check")
    body = []
    for r in rows:
        xb = r["x_bytes"]
        check = {True: "ok", False: "FAIL", None: "—"}[row_ok(r)]
        body.append((r["shape"], str(r["tokens"]), r["mode"], _fmt(r["dropout"], "g"), r["provider"],
                     r["adapter_dtype"] or "—", f"{r['ms']:.4f}", f"{r['ms_p20']:.4f}–{r['ms_p80']:.4f}",
                     _fmt(r["vs_frozen"], ".2f"), _fmt(r["vs_peft"], ".2f"),
                     _fmt(r.get("saved_bytes") and r["saved_bytes"] / xb, ".2f"),
                     _fmt(r.get("saved_bytes_qkv") and r["saved_bytes_qkv"] / xb, ".2f"),
                     _fmt(r["peak_bytes"] and r["peak_bytes"] / 2**20, ".0f"), check))
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    if rows:
        r = rows[0]
        versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v)
        lines += ["", f"{r['device']}; timer {r['timer']}; {r['dtype']} r={r['r']} alpha={r['lora_alpha']}; "
                      f"fastpeft backend {r['fastpeft_backend']}", versions]
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: str | Path) -> Path:
    """Bar chart of time / frozen per cell, mode and dropout, one bar per provider (frozen is the line at 1)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a GPU box or in CI
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["provider"] != "frozen" and r["vs_frozen"] is not None]
    groups = list(dict.fromkeys((r["shape"], r["tokens"], r["mode"], r["dropout"]) for r in shown))
    providers = list(dict.fromkeys(r["provider"] for r in shown))
    value = {(r["shape"], r["tokens"], r["mode"], r["dropout"], r["provider"]): r["vs_frozen"] for r in shown}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(providers)) / 3), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs = [g + i * width for g, cell in enumerate(groups) if (*cell, provider) in value]
        ys = [value[(*cell, provider)] for cell in groups if (*cell, provider) in value]
        ax.bar(xs, ys, width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{s}\nN={n} {m}" + ("" if p is None else f"\np={p:g}") for s, n, m, p in groups],
                       fontsize=7)
    ax.set_ylabel("time / frozen nn.Linear (same run)")
    ax.set_title(f"{rows[0]['device']} — {rows[0]['dtype']}, r={rows[0]['r']}" if rows else "no rows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------ 4-bit: decode and QLoRA
# Two more grids, with their own providers (TARGETS.md §2 and §3). Rows keep the layer rows'
# keys (shape, tokens, mode, dropout, provider, ms, vs_frozen, ...) so the table, the JSON and
# the plot treat them alike; "frozen" is the bf16 baseline of each: a plain ``nn.Linear``.

@dataclass(frozen=True)
class QuantPreset:
    """A 4-bit grid: ``kind`` "decode" (eager inference, no grad) or "qlora" (fwd+bwd)."""

    kind: str
    cells: tuple[tuple[str, int], ...]
    dropouts: tuple[float, ...] = (0.1,)
    blocksize: int = 64


QUANT_PRESETS: dict[str, QuantPreset] = {
    # TARGETS.md §3: N = 1, 4, 16 on the two decode shapes.
    "decode": QuantPreset("decode", tuple((s, n) for s in ("4096x4096", "4096x14336") for n in (1, 4, 16))),
    "decode-tiny": QuantPreset("decode", (("64x96", 1), ("64x96", 3))),
    # TARGETS.md §2: fwd+bwd at N = 8192, p = 0.1.
    "qlora": QuantPreset("qlora", (("4096x4096", 8192), ("4096x14336", 8192))),
    "qlora-tiny": QuantPreset("qlora", (("64x96", 48),)),
}
DECODE_PROVIDERS = ("frozen", "bnb_linear4bit", "bnb_gemv_4bit", "fastpeft_gemv", "fastpeft_gemv_lora",
                    "fastpeft_4bit")
QLORA_PROVIDERS = ("frozen", "bnb_frozen", "peft_bnb", "fastpeft_bf16", "fastpeft_4bit")


def _linear4bit(base: nn.Linear, blocksize: int) -> nn.Module:
    """bitsandbytes ``Linear4bit`` holding ``base``'s weight: NF4, double quantization, compute in base's dtype."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=base.bias is not None,
                              compute_dtype=base.weight.dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
    layer.weight = bnb.nn.Params4bit(base.weight.detach().cpu().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=blocksize)
    if base.bias is not None:
        layer.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    return layer.to(base.weight.device)  # quantizes on the way


def _fast4bit_class():
    try:
        from fastpeft.layers import FastLoraLinear4bit
    except ImportError:
        return None
    return FastLoraLinear4bit


def _fast4bit(spec: LayerSpec, lin4: nn.Module, A: Tensor, B: Tensor) -> Case:
    cls = _fast4bit_class()
    if cls is None:
        raise ImportError("fastpeft.layers.FastLoraLinear4bit is not available")
    layer = cls.from_linear(copy.deepcopy(lin4), r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.dropout)
    return Case(layer, _load_adapters(layer, A, B), _dtype_name(layer.lora_A["default"].weight.dtype))


def _peft_bnb(spec: LayerSpec, lin4: nn.Module, A: Tensor, B: Tensor) -> Case:
    import peft

    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.dropout,
                             target_modules=["0"], init_lora_weights=False)
    model = peft.get_peft_model(nn.Sequential(copy.deepcopy(lin4)), config)
    layer = model.base_model.model[0]
    return Case(layer, _load_adapters(layer, A, B), _dtype_name(layer.lora_A["default"].weight.dtype))


def weight_bytes(module_or_tensor) -> int:
    """Bytes of a layer's frozen weight as stored: bf16 elements, or the 4-bit codes plus every
    quantization statistic (absmax, and with double quantization its codes, scales and tables)."""
    if isinstance(module_or_tensor, Tensor):
        return module_or_tensor.numel() * module_or_tensor.element_size()
    w = module_or_tensor.weight
    total = w.numel() * w.element_size()
    st = getattr(w, "quant_state", None)
    while st is not None:
        total += sum(t.numel() * t.element_size() for t in (st.absmax, st.code) if t is not None)
        st = st.state2 if getattr(st, "nested", False) else None
    return total


def _decode_steps(spec: LayerSpec, base: nn.Linear, lin4: nn.Module, A: Tensor, B: Tensor, x: Tensor) -> dict:
    """provider → (closure to time, weight bytes, module class) for one decode cell. Raises inside
    a provider are recorded on its row, not fatal (bnb's bare GEMV takes one row only, say)."""
    import bitsandbytes.functional as bnbf

    from fastpeft.kernels import interpreting, lora_gemv_4bit

    st = lin4.weight.quant_state
    q = lin4.weight.data
    out_f, in_f = base.out_features, base.in_features
    nested = dict(nested_code=st.state2.code, nested_absmax=st.state2.absmax, nested_blocksize=st.state2.blocksize,
                  nested_offset=st.offset) if st.nested else {}
    w = base.weight.detach()
    xd = x.detach()
    a_t = A.to(x.dtype)
    scale = spec.lora_alpha / spec.r

    def gemv(lora: bool):
        def step():
            xa = xd @ a_t.t() if lora else None  # the rank-r down projection: part of the timed call
            return lora_gemv_4bit(xd, q, st.absmax, st.code, st.blocksize, out_f, in_f, xa=xa,
                                  lora_B=B if lora else None, scale=scale, **nested)
        return step

    def bnb_gemv():
        if xd.shape[0] != 1:
            raise ValueError("bitsandbytes' gemv_4bit takes one row (N = 1)")
        return bnbf.gemv_4bit(xd, q.t(), state=st)

    steps = {
        "frozen": (lambda: torch.nn.functional.linear(xd, w), weight_bytes(w), "torch.nn.functional.linear"),
        "bnb_linear4bit": (lambda: lin4(xd), weight_bytes(lin4), type(lin4).__name__),
        "bnb_gemv_4bit": (bnb_gemv, weight_bytes(lin4), "bitsandbytes.functional.gemv_4bit"),
    }
    if x.device.type == "cuda" or interpreting():  # the bare Triton kernel has no CPU fallback
        steps["fastpeft_gemv"] = (gemv(False), weight_bytes(lin4), "fastpeft.kernels.lora_gemv_4bit")
        steps["fastpeft_gemv_lora"] = (gemv(True), weight_bytes(lin4), "fastpeft.kernels.lora_gemv_4bit + x·Aᵀ")
    if _fast4bit_class() is not None:
        layer = _fast4bit(spec, lin4, A, B).module.eval()
        steps["fastpeft_4bit"] = (lambda: layer(xd), weight_bytes(lin4), type(layer).__name__)
    return steps


def _decode_reference(lin4: nn.Module, A: Tensor, B: Tensor, x: Tensor, scale: float) -> dict[str, Tensor]:
    """fp32 references for the outputs: bnb's own dequantization, then a plain product."""
    import bitsandbytes.functional as bnbf

    w = bnbf.dequantize_4bit(lin4.weight.data, lin4.weight.quant_state).float()
    y = x.float() @ w.t()
    return {"base": y, "lora": y + scale * (x.float() @ A.float().t()) @ B.float().t()}


def _run_quant_cell(grid: QuantPreset, shape: str, n: int, providers: Sequence[str], dt: torch.dtype,
                    dev: torch.device, env: dict, r: int, lora_alpha: float, check: bool, warmup_ms: float,
                    rep_ms: float, seed: int, dropouts: Sequence[float]) -> list[dict]:
    in_f, out_f = parse_shape(shape)
    g = torch.Generator(dev).manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=False, device=dev, dtype=dt).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g, device=dev) * in_f**-0.5)
    A = (torch.rand(r, in_f, generator=g, device=dev) * 2 - 1) * in_f**-0.5
    B = (torch.rand(out_f, r, generator=g, device=dev) * 2 - 1) * r**-0.5
    x = torch.randn(n, in_f, generator=g, device=dev).to(dt)
    lin4 = _linear4bit(base, grid.blocksize)
    cell = {"bench": grid.kind, "shape": shape, "in_features": in_f, "out_features": out_f, "tokens": n,
            "dtype": _dtype_name(dt), "r": r, "lora_alpha": lora_alpha, "x_bytes": x.numel() * x.element_size(),
            "blocksize": grid.blocksize, "quant": "nf4+double-quant"}
    rows = []
    if grid.kind == "decode":
        spec = LayerSpec(r, lora_alpha, 0.0)
        steps = _decode_steps(spec, base, lin4, A, B, x)
        refs = _decode_reference(lin4, A, B, x, lora_alpha / r) if check else {}
        for provider in providers:
            row = {**env, **cell, "provider": provider, "mode": "fwd", "dropout": None, "adapter_dtype": None}
            if provider not in steps:
                why = ("the Triton GEMV needs CUDA (or TRITON_INTERPRET=1)" if provider.startswith("fastpeft_gemv")
                       else "fastpeft.layers.FastLoraLinear4bit not importable")
                rows.append({**row, "missing": why})
                continue
            step, row["weight_bytes"], row["module"] = steps[provider]
            rows.append(_timed_row(row, step, dev, warmup_ms, rep_ms, refs.get(
                "lora" if provider in ("fastpeft_gemv_lora", "fastpeft_4bit") else "base")
                if provider.startswith("fastpeft") else None, dt))
        return rows
    builders = {
        "frozen": lambda spec: Case(copy.deepcopy(base), [], None),
        "bnb_frozen": lambda spec: Case(copy.deepcopy(lin4), [], None),
        "peft_bnb": lambda spec: _peft_bnb(spec, lin4, A, B),
        "fastpeft_bf16": lambda spec: _fastpeft(spec, base, A, B, fp32_adapters=True),
        "fastpeft_4bit": lambda spec: _fast4bit(spec, lin4, A, B),
    }
    x.requires_grad_()
    dy = torch.randn(n, out_f, generator=g, device=dev).to(dt)
    checks: dict = {}
    if check and "fastpeft_4bit" in providers and _fast4bit_class() is not None and "peft_bnb" in providers:
        spec0 = LayerSpec(r, lora_alpha, 0.0)
        _, ref = _forward_backward(builders["peft_bnb"](spec0), x, dy)
        _, ours = _forward_backward(builders["fastpeft_4bit"](spec0), x, dy)
        checks = {**compare_grads(ours, ref, CHECK_TOL[dt]), "check_against": "peft_bnb p=0"}
    for p in dropouts:
        for provider in providers:
            if provider in ("frozen", "bnb_frozen") and p != dropouts[0]:
                continue
            row = {**env, **cell, "provider": provider, "mode": "fwdbwd",
                   "dropout": None if provider in ("frozen", "bnb_frozen") else p}
            try:
                case = builders[provider](LayerSpec(r, lora_alpha, p))
            except ImportError as err:
                rows.append({**row, "adapter_dtype": None, "missing": str(err)})
                continue
            row["adapter_dtype"] = case.adapter_dtype
            row["module"] = type(case.module).__name__
            row["weight_bytes"] = weight_bytes(case.module.base_layer if hasattr(case.module, "base_layer")
                                               else case.module)
            row["saved_bytes"], grads = _forward_backward(case, x, dy)
            row["grads_ok"] = grads_usable({k: v for k, v in grads.items() if k != "y"})
            del grads
            if provider == "fastpeft_4bit":
                row.update(checks)
            step = _step(case, "fwdbwd", x, dy)
            rows.append(_timed_row(row, step, dev, warmup_ms, rep_ms, None, dt))
    return rows


def _timed_row(row: dict, step: Callable[[], object], dev: torch.device, warmup_ms: float, rep_ms: float,
               ref: Tensor | None, dt: torch.dtype) -> dict:
    """Run ``step`` once (checking its output against ``ref`` if given), then time it; an error in
    the first call is recorded on the row (e.g. a provider that does not take this shape)."""
    before = _kernel_launches()
    try:
        out = step()
    except Exception as err:  # noqa: BLE001 - recorded, not fatal: other providers still run
        return {**row, "error": f"{type(err).__name__}: {err}"[:500]}
    after = _kernel_launches()
    row["kernels_per_step"] = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    if ref is not None:
        row.update(compare_grads({"y": out.float()}, {"y": ref}, CHECK_TOL[dt]))
        row["check_against"] = "bnb dequantize_4bit + fp32 matmul"
    del out
    row.update(time_step(step, dev, warmup_ms, rep_ms))
    row["peak_bytes"] = _peak_bytes(step, dev)
    return row


def run_quant(preset: str = "decode-tiny", shapes: Sequence[str] | None = None, tokens: Sequence[int] | None = None,
              providers: Sequence[str] | None = None, dropouts: Sequence[float] | None = None,
              dtype: str | None = None, device: str | torch.device = "auto", r: int = 16, lora_alpha: float = 32,
              check: bool = True, warmup_ms: float = 25, rep_ms: float = 120, seed: int = 0) -> list[dict]:
    """Benchmark a 4-bit preset (``QUANT_PRESETS``): decode GEMV or QLoRA layer rows.

    decode — eager forward, no grad: bf16 ``F.linear`` (cuBLAS; "frozen"), bitsandbytes
    ``Linear4bit`` (NF4, double quant; its GEMV at N = 1), bnb's bare ``gemv_4bit`` (N = 1 only),
    ``lora_gemv_4bit`` without and with the LoRA term (the latter including ``x Aᵀ``), and
    ``FastLoraLinear4bit`` if present; each row has the weight bytes and, for fastpeft, a check
    against bnb's dequantization. qlora — fwd+bwd: bf16 frozen ``nn.Linear``, bnb ``Linear4bit``
    frozen, peft LoRA on it, ``FastLoraLinear`` (bf16 base), and ``FastLoraLinear4bit`` if present
    (else a row with ``missing``). Example::

        rows = run_quant("decode", tokens=[1])
    """
    grid = QUANT_PRESETS[preset]
    known = DECODE_PROVIDERS if grid.kind == "decode" else QLORA_PROVIDERS
    providers = _providers(providers, known, f" for {preset}")
    dev, dt = resolve_device(device), _DTYPES[dtype or "bf16"]
    env = environment(dev, dt)
    cells = _cells(Preset(cells=grid.cells), shapes, tokens)
    rows: list[dict] = []
    for shape, n in cells:
        rows += _run_quant_cell(grid, shape, n, tuple(providers), dt, dev, env, r, lora_alpha, check, warmup_ms,
                                rep_ms, seed, tuple(grid.dropouts if dropouts is None else dropouts))
    add_quant_ratios(rows)
    return rows


def add_quant_ratios(rows: list[dict]) -> None:
    """``vs_frozen`` = time / the bf16 baseline's in the same cell; ``vs_peft`` (qlora) = time / peft+bnb's
    at the same dropout; ``vs_bnb`` (decode) = time / bnb ``Linear4bit``'s."""
    def key(r: dict, *extra: str) -> tuple:
        return (r["shape"], r["tokens"], *(r[k] for k in extra))

    timed = [r for r in rows if "ms" in r]
    frozen = {key(r): r["ms"] for r in timed if r["provider"] == "frozen"}
    peft = {key(r, "dropout"): r["ms"] for r in timed if r["provider"] == "peft_bnb"}
    bnb = {key(r): r["ms"] for r in timed if r["provider"] == "bnb_linear4bit"}
    for r in rows:
        ms = r.get("ms")
        r["vs_frozen"] = ms / frozen[key(r)] if ms and key(r) in frozen else None
        r["vs_peft"] = ms / peft[key(r, "dropout")] if ms and key(r, "dropout") in peft else None
        if r["bench"] == "decode":
            r["vs_bnb"] = ms / bnb[key(r)] if ms and key(r) in bnb else None


def format_quant_table(rows: list[dict]) -> str:
    """Fixed-width table of 4-bit rows (errors and missing providers shown in place of a time)."""
    head = ("bench", "shape", "N", "p", "provider", "ms", "p20–p80", "×bf16", "×peft", "×bnb", "weight MiB",
            "check")
    body = []
    for r in rows:
        if "ms" not in r:
            why = r.get("error") or f"missing: {r.get('missing')}"
            body.append((r["bench"], r["shape"], str(r["tokens"]), _fmt(r["dropout"], "g"), r["provider"],
                         why[:60], "", "", "", "", "", ""))
            continue
        check = {True: "ok", False: "FAIL", None: "—"}[row_ok(r)]
        body.append((r["bench"], r["shape"], str(r["tokens"]), _fmt(r["dropout"], "g"), r["provider"],
                     f"{r['ms']:.4f}", f"{r['ms_p20']:.4f}–{r['ms_p80']:.4f}", _fmt(r["vs_frozen"], ".2f"),
                     _fmt(r["vs_peft"], ".2f"), _fmt(r.get("vs_bnb"), ".2f"),
                     _fmt(r.get("weight_bytes") and r["weight_bytes"] / 2**20, ".3f"), check))
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    if rows:
        r = rows[0]
        versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v)
        lines += ["", f"{r['device']}; {r['dtype']} r={r['r']} alpha={r['lora_alpha']}; "
                      f"fastpeft backend {r['fastpeft_backend']}", versions]
    return "\n".join(lines)


# ------------------------------------------------------------ mixed-adapter batches (issue 9)
@dataclass(frozen=True)
class MixedPreset:
    """A mixed-adapter grid: shapes × adapter counts, each adapter with ``tokens_per_adapter`` tokens."""

    shapes: tuple[str, ...]
    adapters: tuple[int, ...]
    tokens_per_adapter: int


MIXED_PRESETS: dict[str, MixedPreset] = {
    "mixed": MixedPreset(("4096x4096", "4096x14336"), (1, 4, 16, 64), 512),
    "mixed-tiny": MixedPreset(("64x96",), (1, 4), 8),
}
# fastpeft_mixed: one FastLoraLinear holding n adapters, adapter_names one per sequence; fastpeft_single: the
# same batch through one adapter; peft_mixed: peft's adapter_names (its per-adapter sub-batch loop; in
# training its layer is called directly, as peft's model refuses adapter_names there); frozen: the base.
MIXED_PROVIDERS = ("frozen", "fastpeft_single", "fastpeft_mixed", "peft_mixed")


def _mixed_layer(provider: str, base: nn.Linear, As: list[Tensor], Bs: list[Tensor], r: int,
                 lora_alpha: float) -> tuple[nn.Module, list[Tensor]]:
    n = len(As) if provider != "fastpeft_single" else 1
    names = [f"a{i}" for i in range(n)]
    if provider == "frozen":
        return copy.deepcopy(base).requires_grad_(False), []
    if provider == "peft_mixed":
        import peft

        config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["0"], init_lora_weights=False)
        model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config)
        layer = model.base_model.model[0]
        layer.set_adapter(names)
    else:
        layer = FastLoraLinear.from_linear(copy.deepcopy(base), r=r, lora_alpha=lora_alpha, init_lora_weights=False,
                                           adapter_name=names[0])
        for name in names[1:]:
            layer.update_layer(name, r=r, lora_alpha=lora_alpha, init_lora_weights=False)
        layer.set_adapter(names)
    params = []
    with torch.no_grad():
        for i, name in enumerate(names):
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            a.copy_(As[i]), b.copy_(Bs[i])
            params += [a, b]
    return layer, params


def _mixed_step(provider: str, layer: nn.Module, names: list[str], mode: str, x: Tensor, dy: Tensor):
    kwargs = {} if provider in ("frozen", "fastpeft_single") else {"adapter_names": names}
    if mode == "fwd":
        layer.eval()

        def fwd():
            with torch.no_grad():
                return layer(x, **kwargs)
        return fwd
    layer.train()

    def fwdbwd():
        x.grad = None
        layer(x, **kwargs).backward(dy)
    return fwdbwd


def run_mixed(preset: str = "mixed-tiny", shapes: Sequence[str] | None = None,
              adapters: Sequence[int] | None = None, providers: Sequence[str] | None = None,
              modes: Sequence[str] | None = None, dtype: str | None = None, device: str | torch.device = "auto",
              r: int = 16, lora_alpha: float = 32, check: bool = True, warmup_ms: float = 25, rep_ms: float = 120,
              seed: int = 0) -> list[dict]:
    """Mixed-adapter batches: n adapters × ``tokens_per_adapter`` tokens (one sequence each) on one layer.

    One row per (shape, n, mode, provider) with ``vs_single`` (time / fastpeft_single's), ``vs_peft``
    and ``vs_frozen``; fastpeft_mixed rows carry a check of y (and dx in fwdbwd) against peft_mixed.
    """
    grid = MIXED_PRESETS[preset]
    providers = _providers(providers, MIXED_PROVIDERS)
    dev, dt = resolve_device(device), _DTYPES[dtype or "bf16"]
    env = environment(dev, dt)
    rows: list[dict] = []
    for shape in shapes or grid.shapes:
        in_f, out_f = parse_shape(shape)
        for n in adapters or grid.adapters:
            g = torch.Generator(dev).manual_seed(seed)
            base = nn.Linear(in_f, out_f, bias=False, device=dev, dtype=dt)
            with torch.no_grad():
                base.weight.copy_(torch.randn(out_f, in_f, generator=g, device=dev) * in_f**-0.5)
            As = [(torch.rand(r, in_f, generator=g, device=dev) * 2 - 1) * in_f**-0.5 for _ in range(n)]
            Bs = [(torch.rand(out_f, r, generator=g, device=dev) * 2 - 1) * r**-0.5 for _ in range(n)]
            t = grid.tokens_per_adapter
            x = torch.randn(n, t, in_f, generator=g, device=dev).to(dt).requires_grad_()
            dy = torch.randn(n, t, out_f, generator=g, device=dev).to(dt)
            names = [f"a{i}" for i in range(n)]
            cell = {"bench": "mixed", "shape": shape, "in_features": in_f, "out_features": out_f, "adapters": n,
                    "tokens": n * t, "dtype": _dtype_name(dt), "r": r, "lora_alpha": lora_alpha, "dropout": 0.0}
            outputs: dict = {}
            for mode in modes or MODES:
                for provider in providers:
                    row = {**env, **cell, "provider": provider, "mode": mode}
                    layer, params = _mixed_layer(provider, base, As, Bs, r, lora_alpha)
                    step = _mixed_step(provider, layer, names, mode, x, dy)
                    if check and provider in ("fastpeft_mixed", "peft_mixed"):
                        kw = {"adapter_names": names}
                        layer.train(mode == "fwdbwd")
                        x.grad = None
                        y = layer(x, **kw)
                        if mode == "fwdbwd":
                            y.backward(dy)
                        outputs[provider, mode] = (y.detach(), None if x.grad is None else x.grad.clone())
                    before = _kernel_launches()
                    step()
                    after = _kernel_launches()
                    row["kernels_per_step"] = {k: v - before.get(k, 0) for k, v in after.items()
                                               if v != before.get(k, 0)}
                    row.update(time_step(step, dev, warmup_ms, rep_ms))
                    row["peak_bytes"] = _peak_bytes(step, dev)
                    rows.append(row)
                    del layer, params, step
                ours, ref = outputs.get(("fastpeft_mixed", mode)), outputs.get(("peft_mixed", mode))
                if ours is not None and ref is not None:
                    errs = {"y": relative_error(ours[0], ref[0])}
                    if mode == "fwdbwd":
                        errs["dx"] = relative_error(ours[1], ref[1])
                    for row in rows:
                        if row["provider"] == "fastpeft_mixed" and row["mode"] == mode and row["shape"] == shape \
                                and row["adapters"] == n:
                            row["check_errors"] = errs
                            row["check_ok"] = all(e <= CHECK_TOL[dt] for e in errs.values())
                            row["check_against"] = "peft_mixed p=0"
            x.grad = None
    add_mixed_ratios(rows)
    return rows


def add_mixed_ratios(rows: list[dict]) -> None:
    """``vs_single`` / ``vs_peft`` / ``vs_frozen``: time over fastpeft_single's / peft_mixed's / frozen's
    in the same (shape, adapters, mode)."""
    def key(r: dict) -> tuple:
        return (r["shape"], r["adapters"], r["mode"])

    by = {(key(r), r["provider"]): r["ms"] for r in rows}
    for r in rows:
        for name, provider in (("vs_single", "fastpeft_single"), ("vs_peft", "peft_mixed"), ("vs_frozen", "frozen")):
            ref = by.get((key(r), provider))
            r[name] = r["ms"] / ref if ref else None


def format_mixed_table(rows: list[dict]) -> str:
    """Fixed-width table of mixed-adapter rows."""
    head = ("shape", "adapters", "N", "mode", "provider", "ms", "×single", "×peft", "×frozen", "check")
    body = [(r["shape"], str(r["adapters"]), str(r["tokens"]), r["mode"], r["provider"], f"{r['ms']:.4f}",
             _fmt(r["vs_single"], ".2f"), _fmt(r["vs_peft"], ".3f"), _fmt(r["vs_frozen"], ".2f"),
             {True: "ok", False: "FAIL", None: "—"}[r.get("check_ok")]) for r in rows]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    if rows:
        r = rows[0]
        lines += ["", f"{r['device']}; timer {r['timer']}; {r['dtype']} r={r['r']} alpha={r['lora_alpha']}; "
                      f"fastpeft backend {r['fastpeft_backend']}"]
    return "\n".join(lines)


def plot_mixed_rows(rows: list[dict], path: str | Path) -> Path:
    """ms against the number of adapters, one panel per (shape, mode), one line per provider (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["shape"], r["mode"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (shape, mode) in zip(axes[0], panels):
        for provider in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted((r["adapters"], r["ms"]) for r in rows
                         if r["shape"] == shape and r["mode"] == mode and r["provider"] == provider)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{shape} {mode}")
        ax.set_xlabel("adapters in the batch")
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if rows:
        fig.suptitle(f"mixed-adapter batches, {rows[0]['device']} ({rows[0]['dtype']}, r={rows[0]['r']})",
                     fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
