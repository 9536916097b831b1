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
``fastpeft`` / ``fastpeft_bf16`` (``FastLoraLinear`` likewise).

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
MODES = ("fwd", "fwdbwd")
# Relative-norm tolerance of the fastpeft-vs-peft check, by activation dtype: twice
# DESIGN.md's bound against an exact reference, since both sides round independently.
CHECK_TOL = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 2e-2}
_CHECKED_AGAINST = {"fastpeft": "peft", "fastpeft_bf16": "peft_bf16"}
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


@dataclass(frozen=True)
class LayerSpec:
    """What every provider of one row is built with."""

    r: int
    lora_alpha: float
    dropout: float


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
                             target_modules=["0"], init_lora_weights=False)
    # The smallest model peft injects into: the Linear as module "0" of a Sequential.
    model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), config, autocast_adapter_dtype=fp32_adapters)
    # Time peft's LoRA layer itself, not PeftModel.forward's kwargs plumbing around it.
    layer = model.base_model.model[0]
    return Case(layer, _load_adapters(layer, A, B), _dtype_name(layer.lora_A["default"].weight.dtype))


def _fastpeft(spec: LayerSpec, base: nn.Linear, A: Tensor, B: Tensor, fp32_adapters: bool) -> Case:
    layer = FastLoraLinear.from_linear(copy.deepcopy(base), r=spec.r, lora_alpha=spec.lora_alpha,
                                       lora_dropout=spec.dropout, init_lora_weights=False,
                                       autocast_adapter_dtype=fp32_adapters)
    return Case(layer, _load_adapters(layer, A, B), _dtype_name(layer.lora_A["default"].weight.dtype))


@torch.no_grad()
def _load_adapters(layer: nn.Module, A: Tensor, B: Tensor) -> list[Tensor]:
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a.copy_(A)
    b.copy_(B)
    return [a, b]


BUILDERS: dict[str, Callable[[LayerSpec, nn.Linear, Tensor, Tensor], Case]] = {
    "frozen": _frozen,
    "cublas": _cublas,
    "peft": lambda *a: _peft(*a, fp32_adapters=True),
    "peft_bf16": lambda *a: _peft(*a, fp32_adapters=False),
    "fastpeft": lambda *a: _fastpeft(*a, fp32_adapters=True),
    "fastpeft_bf16": lambda *a: _fastpeft(*a, fp32_adapters=False),
}


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype))


# ------------------------------------------------------------------- measures
class SavedTensorCounter:
    """Bytes autograd saves for backward inside a ``with`` block, each storage once.

    Tensors whose storage is one of ``exclude``'s (the parameters) are not
    counted. Storages are held until the counter is dropped, so a freed one
    cannot hand its address to a later tensor and be mistaken for it.

    Example::

        with SavedTensorCounter(exclude=layer.parameters()) as saved:
            y = layer(x)
        saved.nbytes
    """

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._excluded:
            self._storages.setdefault(storage.data_ptr(), storage)
        return t

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self._storages.values())


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
    """One train-mode fwd+bwd: (saved bytes, {"y", "dx", "dA", "dB"})."""
    case.module.train()
    with SavedTensorCounter(exclude=case.module.parameters()) as saved:
        y = case.module(x)
    grads = torch.autograd.grad(y, [x, *case.adapters], dy)
    return saved.nbytes, dict(zip(("y", "dx", "dA", "dB"), (y.detach(), *grads)))


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


def time_step(step: Callable[[], object], device: torch.device, warmup_ms: float = 25,
              rep_ms: float = 120) -> dict:
    """Median and p20/p80 of ``step`` in ms, plus the raw samples.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each
    call), since a wall clock around asynchronous kernels lies. Elsewhere: a
    wall clock over as many calls as fit in ``rep_ms`` (5 to 50).
    """
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
    if device.type != "cuda":
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
    if providers is None:  # by default, peft's rows only where peft is installed (it is optional)
        has_peft = importlib.util.find_spec("peft") is not None
        providers = [p for p in grid.providers if has_peft or not p.startswith("peft")]
    providers, modes = tuple(providers), tuple(modes or grid.modes)
    dropouts = tuple(grid.dropouts if dropouts is None else dropouts)
    for given, known in ((providers, PROVIDERS), (modes, MODES)):
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
    """Set ``vs_frozen`` (time / frozen's, same cell and mode) and ``vs_peft`` (/ peft's, same dropout too)."""
    def key(r: dict, *extra: str) -> tuple:
        return (r["shape"], r["tokens"], r["mode"], *(r[k] for k in extra))

    frozen = {key(r): r["ms"] for r in rows if r["provider"] == "frozen"}
    peft = {key(r, "dropout"): r["ms"] for r in rows if r["provider"] == "peft"}
    for r in rows:
        r["vs_frozen"] = r["ms"] / frozen[key(r)] if key(r) in frozen else None
        r["vs_peft"] = r["ms"] / peft[key(r, "dropout")] if key(r, "dropout") in peft else None


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
