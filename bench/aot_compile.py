"""Compile every kernel specialization for sm_90 ahead of time, with no GPU, through the real launchers.

Unlike tests/test_compile.py (hand-written signatures), this drives the launchers themselves
(``lora_gemm``, ``lora_down``, ``lora_reduce``, the TMA GEMM, the 4-bit GEMV and dequantization, the
mixed-adapter kernels) with CPU tensors under a stand-in Triton driver whose target is
``GPUTarget("cuda", 90, 32)``: Triton's own binder computes the signature, the alignment
specializations (``tt.divisibility``), the tensor-descriptor types and the constexprs exactly as it
would on the GPU; the kernel is compiled to a cubin with the ptxas in Triton's wheel and never
launched. Each forced autotune config is compiled, and its shared memory is checked against the
H200's per-block limit (227 KB, ``sharedMemPerBlockOptin``) — the check Triton makes at the first
launch (``OutOfResources``). Registers and spills come from ``cuobjdump --dump-resource-usage``.

    python bench/aot_compile.py            # one pass over the GPU test / benchmark specializations
    python bench/aot_compile.py --all      # every autotune config of every specialization (slow)

Run without TRITON_INTERPRET. Prints one line per compiled specialization and a summary table.
"""

# ruff: noqa: B023  (each lambda runs at once inside _each, in its own loop iteration)
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import traceback

# Compile this checkout's kernels (not those of an installed fastpeft): the repository root goes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("TRITON_INTERPRET", None)
os.environ["FASTPEFT_AUTOTUNE"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

H200_SMEM = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90 (227 KB)
H200_SMS = 132
TARGET = GPUTarget("cuda", 90, 32)


class _FakeDriver:
    """Just enough of triton.runtime.driver for JITFunction.run to bind and compile for sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True

    def get_benchmarker(self):
        """The autotuner's timer (``--only bench-tuned``): one call of the config, which compiles it (or finds
        it in the on-disk cache) and launches nothing; every config "takes" 1 ms."""
        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()
            return [1.0, 1.0, 1.0] if quantiles else 1.0
        return bench


_driver.set_active(_FakeDriver())

RECORDS: list[dict] = []
RAISE_OVER_SMEM = False  # --untuned: a kernel over the limit raises OutOfResources, as its first launch would
_CURRENT = {"tag": ""}
_orig_run = JITFunction.run


def _run_no_launch(self, *args, grid, warmup, **kwargs):
    t0 = time.time()
    before = len(self.device_caches[0][0])
    try:
        kernel = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as err:  # a compile failure is a finding: record it and go on
        RECORDS.append(dict(kernel=self.fn.__name__, tag=_CURRENT["tag"], ok=False,
                            err=f"{type(err).__name__}: {str(err)[:2000]}", secs=time.time() - t0))
        print(f"FAIL {self.fn.__name__} [{_CURRENT['tag']}]: {type(err).__name__}: {str(err)[:600]}", flush=True)
        return None
    if RAISE_OVER_SMEM and len(self.device_caches[0][0]) == before and kernel is not None \
            and kernel.metadata.shared > H200_SMEM:  # a cached kernel over the limit fails at every launch
        from triton.runtime.errors import OutOfResources
        raise OutOfResources(kernel.metadata.shared, H200_SMEM, "shared memory")
    if len(self.device_caches[0][0]) > before:  # newly compiled (not a cache hit)
        md = kernel.metadata
        regs, spill = _resources(kernel)
        rec = dict(kernel=self.fn.__name__, tag=_CURRENT["tag"], ok=True, shared=md.shared, warps=md.num_warps,
                   stages=md.num_stages, regs=regs, spill=spill, secs=time.time() - t0,
                   fits=md.shared <= H200_SMEM, scratch=getattr(md, "global_scratch_size", 0))
        RECORDS.append(rec)
        if RAISE_OVER_SMEM and not rec["fits"]:
            print(f"  (launch would raise OutOfResources: {md.shared} B > {H200_SMEM} B)", flush=True)
            from triton.runtime.errors import OutOfResources
            raise OutOfResources(md.shared, H200_SMEM, "shared memory")
        print(f"{'ok  ' if rec['fits'] else 'SMEM'} {rec['kernel']:<24} smem={md.shared:>6} w={md.num_warps} "
              f"s={md.num_stages} regs={regs} stack={spill} scratch={rec['scratch']} {rec['secs']:.1f}s "
              f"[{_CURRENT['tag']}]", flush=True)
    return kernel


JITFunction.run = _run_no_launch

_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(kernel):
    """(registers, spill bytes) of a compiled kernel's cubin, or (None, None)."""
    cubin = kernel.asm.get("cubin")
    if cubin is None or not os.path.exists(_CUOBJDUMP):
        return None, None
    path = f"/tmp/aot_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        out = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True,
                             timeout=60).stdout
    except Exception:
        return None, None
    finally:
        os.remove(path)
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(stack.group(1)) if stack else None)


# The launchers, imported after the driver stand-in is active and with the interpreter off.
import fastpeft.kernels.dequant4bit as DQ  # noqa: E402
import fastpeft.kernels.lora_gemm_tma as TM  # noqa: E402
import fastpeft.kernels.lora_gemv4bit as GV  # noqa: E402
import fastpeft.kernels.lora_linear as LL  # noqa: E402
import fastpeft.kernels.lora_mixed as MX  # noqa: E402
from fastpeft.kernels.configs import down_configs, gemm_configs, reduce_configs  # noqa: E402

print(f"kernels from {os.path.dirname(LL.__file__)}, triton {triton.__version__}, target {TARGET}", flush=True)
LL._num_sms = lambda device: H200_SMS  # the persistent grid's NUM_SMS as on the H200
MX._num_sms = LL._num_sms

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DT = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}


def _t(*shape, dtype=FP32):
    return torch.randn(*shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(*shape, dtype=dtype)


def _configs(cfgs, full):
    return cfgs if full else cfgs[:1]


def _each(label, fn, cfgs, full):
    for i, cfg in enumerate(_configs(cfgs, full)):
        _CURRENT["tag"] = f"{label} cfg{i} {cfg.kwargs}"
        try:
            fn(cfg)
        except Exception as err:
            RECORDS.append(dict(kernel="(launcher)", tag=_CURRENT["tag"], ok=False,
                                err=f"{type(err).__name__}: {err}", secs=0.0))
            print(f"FAIL launcher [{_CURRENT['tag']}]: {type(err).__name__}: {err}", flush=True)
            traceback.print_exc(limit=3)


def core(full, dtypes, ranks, shapes, adapter_dtype=FP32):
    seed = torch.tensor([1234], dtype=torch.int64)
    for (M, K, N) in shapes:
        for dt in dtypes:
            x = _t(M, K, dtype=dt)
            w = _t(N, K, dtype=dt)
            bias = _t(N, dtype=dt)
            dy = _t(M, N, dtype=dt)
            for r in ranks:
                A = _t(r, K, dtype=adapter_dtype)  # fp32 by default; bf16 after model.to(torch.bfloat16)
                B = _t(N, r, dtype=adapter_dtype)
                xa = _t(M, r)
                dS = _t(M, r)
                lab = f"{DT[dt]} M{M} K{K} N{N} r{r}" + ("" if adapter_dtype == FP32 else f" A/B {DT[adapter_dtype]}")
                # forward: xa = D(x) Aᵀ (p = 0 and p > 0), y = x W0ᵀ + b + xa (sB)ᵀ
                for drop in (False, True):
                    _each(f"down {lab} drop={drop}",
                          lambda c: LL.lora_down(x, A, seed=seed, threshold=6554, dropout=drop, config=c),
                          down_configs(False), full)
                _each(f"down dS {lab}", lambda c: LL.lora_down(dy, B.t(), out_scale=2.0, config=c),
                      down_configs(False), full)
                _each(f"gemm fwd {lab}",
                      lambda c: LL.lora_gemm(x, w, bias, xa, B.t(), lora_scale=2.0, config=c, impl="pointer"),
                      gemm_configs(False), full)
                # dgrad through W0ᵀ (a transposed view), dropout-masked rank-r term in the epilogue
                for mask in (False, True):
                    _each(f"gemm dgrad {lab} mask={mask}",
                          lambda c: LL.lora_gemm(dy, w.t(), None, dS, A, seed=seed, threshold=6554,
                                                 inv_keep=1 / 0.9, mask_lora=mask, out_dtype=dt, config=c,
                                                 impl="pointer"),
                          gemm_configs(False), full)
                # TMA GEMM (bf16/fp16 under auto; fp32 only when forced)
                if dt != FP32 and _tma_ok(x, w, _t(M, N, dtype=dt)) and _tma_ok(dy, w.t(), _t(M, K, dtype=dt)):
                    _each(f"tma fwd {lab}",
                          lambda c: LL._lora_gemm_tma(x, w, bias, xa, B.t(), torch.empty(M, N, dtype=dt), None, r,
                                                      True, 2.0, 0, 1.0, False, c),
                          TM.tma_configs(False), full)
                    for mask in (False, True):
                        _each(f"tma dgrad {lab} mask={mask}",
                              lambda c: LL._lora_gemm_tma(dy, w.t(), None, dS, A, torch.empty(M, K, dtype=dt), seed,
                                                          r, True, 1.0, 6554, 1 / 0.9, mask, c),
                              TM.tma_configs(False), full)
                else:
                    print(f"(TMA not applicable: {lab})")
                # dA = dSᵀ D(x) (+ dx in place), dB = dyᵀ xa (+ db)
                dx = _t(M, K, dtype=dt)
                for drop in (False, True):
                    add = (A, dx) if LL.reduce_can_add_dx(r) and drop else None
                    _each(f"reduce dA {lab} drop={drop} add_dx={add is not None}",
                          lambda c: LL.lora_reduce(dS, x, out_scale=1 / 0.9, seed=seed, threshold=6554, dropout=drop,
                                                   add_dx=add, config=c),
                          reduce_configs(False), full)
                _each(f"reduce dB {lab}",
                      lambda c: LL.lora_reduce(xa, dy, out_scale=2.0, dbias=True, transpose_out=True, config=c),
                      reduce_configs(False), full)


def _tma_ok(x, w, out):
    return TM._aligned(x, 1) and TM._aligned(out, 1) and (TM._aligned(w, 1) or TM._aligned(w, 0))


QUANT_SHAPES = ((4096, 4096, 64), (300, 4096, 128), (96, 200, 64))
CORE_SHAPES = ((257, 4096, 4096), (77, 45, 131))


def quant4(full, dtypes, shapes=QUANT_SHAPES, kinds=("nf4", "nf4-nested", "int4")):
    # 4-bit GEMV: NF4 plain/nested, int4; N = 1, 4, 16 rows; aligned and odd in_features.
    code = torch.linspace(-1, 1, 16)
    for (out_f, in_f, bs) in shapes:
        numel = out_f * in_f
        packed = torch.zeros((numel + 1) // 2, dtype=torch.uint8)
        absmax = torch.rand(triton.cdiv(numel, bs))
        a8 = torch.zeros(triton.cdiv(numel, bs), dtype=torch.uint8)
        ncode = torch.rand(256)
        nabs = torch.rand(triton.cdiv(a8.numel(), 256))
        for dt in dtypes:
            for n in (1, 4, 16):
                x = _t(n, in_f, dtype=dt)
                xa = _t(n, 16)
                B = _t(out_f, 16)
                bias = _t(out_f, dtype=dt)
                lab = f"{DT[dt]} {out_f}x{in_f} bs{bs} N{n}"
                cfgs = GV.gemv4bit_configs(False)
                if "nf4" in kinds:
                    _each(f"gemv nf4 {lab}", lambda c: GV.lora_gemv_4bit(x, packed, absmax, code, bs, out_f, in_f,
                                                                     bias=bias, xa=xa, lora_B=B, scale=2.0, config=c),
                      cfgs, full)
                if "nf4-nested" in kinds:
                    _each(f"gemv nf4-nested {lab}",
                      lambda c: GV.lora_gemv_4bit(x, packed, a8, code, bs, out_f, in_f, nested_code=ncode,
                                                  nested_absmax=nabs, nested_offset=torch.tensor([0.01]), bias=bias,
                                                  xa=xa, lora_B=B, scale=2.0, config=c),
                      cfgs, full)
                if in_f % 2 == 0 and "int4" in kinds:
                    g = 128
                    pk = torch.zeros(out_f, in_f // 2, dtype=torch.uint8)
                    sc = torch.rand(out_f, triton.cdiv(in_f, g), dtype=FP16)
                    zr = torch.zeros(out_f, triton.cdiv(in_f, g), dtype=torch.uint8)
                    _each(f"gemv int4 {lab}", lambda c: GV.lora_gemv_int4(x, pk, sc, zr, g, out_f, in_f, xa=xa,
                                                                          lora_B=B, config=c), cfgs, full)
            _CURRENT["tag"] = f"dequant {DT[dt]} {out_f}x{in_f}"
            DQ.dequantize_4bit(packed, absmax, code, bs, out_f, in_f, dt)
            DQ.dequantize_4bit(packed, a8, code, bs, out_f, in_f, dt, nested_code=ncode, nested_absmax=nabs,
                               nested_offset=0.01)
            if in_f % 2 == 0:
                DQ.dequantize_int4(torch.zeros(out_f, in_f // 2, dtype=torch.uint8),
                                   torch.rand(out_f, triton.cdiv(in_f, 128), dtype=FP16),
                                   torch.zeros(out_f, triton.cdiv(in_f, 128), dtype=torch.uint8), 128, out_f, in_f,
                                   dt)


def mixed(full, dtypes):
    seed = torch.tensor([7], dtype=torch.int64)
    for (M, K, N, R, n) in ((300, 256, 384, 16, 4), (1024, 4096, 4096, 64, 16), (77, 45, 45, 8, 3)):
        for dt in dtypes:
            x = _t(M, K, dtype=dt)
            dy = _t(M, N, dtype=dt)
            A = _t(n, R, K)
            B = _t(n, N, R)
            idx = torch.zeros(M, dtype=torch.int64)
            perm = torch.arange(M)
            seg = torch.linspace(0, M, n + 1).long()
            scale = torch.ones(n)
            thr = torch.full((n,), 6554, dtype=torch.int32)
            lab = f"{DT[dt]} M{M} K{K} N{N} R{R} n{n}"
            for drop in (False, True):
                _each(f"mixed down {lab} drop={drop}",
                      lambda c: MX.mixed_down(x, A, idx, perm, scale, thr=thr, seed=seed, dropout=drop, config=c),
                      down_configs(False), full)
                _each(f"mixed up {lab} drop={drop}",
                      lambda c: MX.mixed_up_(torch.empty(M, K, dtype=dt), _t(M, R), A, idx, perm, scale, thr=thr,
                                             seed=seed, dropout=drop, config=c),
                      MX.up_configs(False), full)
                _each(f"mixed reduce {lab} drop={drop}",
                      lambda c: MX.mixed_reduce(_t(M, R), x, perm, seg, scale, n, thr=thr, seed=seed, dropout=drop,
                                                config=c),
                      reduce_configs(False), full)
            _each(f"mixed up y {lab}",
                  lambda c: MX.mixed_up_(torch.empty(M, N, dtype=dt), _t(M, R), B.transpose(1, 2), idx, perm, scale,
                                         config=c),
                  MX.up_configs(False), full)
            _each(f"mixed reduce dB {lab}",
                  lambda c: MX.mixed_reduce(_t(M, R), dy, perm, seg, scale, n, transpose_out=True, config=c),
                  reduce_configs(False), full)


def untuned(dtypes, ranks):
    """The launch path of the gpu tests (FASTPEFT_AUTOTUNE=0, no forced config): each op's first config that
    fits, a config over the shared-memory limit raising OutOfResources as on the device (the launcher then
    takes the next). The TMA GEMM is taken where the device's dispatch would take it (aligned 16-bit
    operands, more than 32 rows). A launch that still fails is a finding."""
    global RAISE_OVER_SMEM
    RAISE_OVER_SMEM = True
    LL.tma_supported = lambda x, w, out: x.dtype == w.dtype and x.element_size() in (2, 4) and _tma_ok(x, w, out)
    LL.interpreting = lambda: False
    seed = torch.tensor([5], dtype=torch.int64)
    for (M, fin, fout) in ((16, 4096, 4096), (1000, 4096, 4096), (77, 45, 123)):
        for dt in dtypes:
            for r in ranks:
                for p in (0.0, 0.1):
                    x, W, b = _t(M, fin, dtype=dt), _t(fout, fin, dtype=dt), _t(fout, dtype=dt)
                    A, B, dy = _t(r, fin), _t(fout, r), _t(M, fout, dtype=dt)
                    thr = round(p * 65536)
                    _CURRENT["tag"] = f"untuned lora_linear {DT[dt]} M{M} {fin}->{fout} r{r} p{p}"
                    try:
                        y, xa = LL.lora_linear_forward(x, W, b, A, B, seed, 2.0, p, False, thr)
                        LL.lora_linear_backward(dy, x, W, A, B, xa, seed, 2.0, p, False, thr, need_dbias=True)
                    except Exception as err:
                        RECORDS.append(dict(kernel="(launch)", tag=_CURRENT["tag"], ok=False,
                                            err=f"{type(err).__name__}: {err}", secs=0.0))
                        print(f"FAIL launch [{_CURRENT['tag']}]: {type(err).__name__}: {str(err)[:300]}", flush=True)


def bench(argv: str, compile_only: bool = True) -> int:
    """``fastpeft bench ARGV --compile-only`` through the real harness, ops and launchers, on CPU tensors: what
    one warm-up process of bench/gpu_run.sh compiles on the device (FASTPEFT_AUTOTUNE=warm: every config the
    autotuner would time, after its prune, for every launch the preset makes). The TMA GEMM is taken where
    the device's dispatch would take it, as in ``untuned``."""
    import shlex

    import fastpeft.ops as OPS
    import fastpeft.ops4bit as OPS4
    import fastpeft.ops_mixed as OPSM
    from fastpeft import cli

    for mod in (OPS, OPS4, OPSM):  # the kernels on CPU tensors, as they run on CUDA ones there
        if hasattr(mod, "backend_for"):
            mod.backend_for = lambda t: "triton"
    LL.tma_supported = lambda x, w, out: x.dtype == w.dtype and x.element_size() in (2, 4) and _tma_ok(x, w, out)
    for mod in (LL, MX, GV, DQ):
        if hasattr(mod, "interpreting"):
            mod.interpreting = lambda: False
    _CURRENT["tag"] = f"bench {argv}"
    # Outputs are never computed under the stand-in driver, so the harness's own checks fail: the exit status
    # is printed, not counted as a compile failure.
    import tempfile

    # (the timed path writes a result file: into a scratch folder, not bench/results)
    mode = ["--compile-only"] if compile_only else ["--out", os.path.join(tempfile.mkdtemp(), "replay.json")]
    return cli.main(["bench", *shlex.split(argv), *mode, "--device", "cpu"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="every autotune config (default: the first of each list)")
    ap.add_argument("--only", nargs="*", default=["core", "quant4", "mixed"],
                    help="core, quant4, mixed, untuned (the FASTPEFT_AUTOTUNE=0 launch path of lora_linear), bench "
                         "(a `fastpeft bench --compile-only` run, see --bench) and/or bench-tuned (the same "
                         "bench's autotuner path: run it after bench into one TRITON_CACHE_DIR to check that "
                         "the warm-up compiled every kernel it looks up)")
    ap.add_argument("--dtypes", nargs="*", default=["bf16", "fp16", "fp32"])
    ap.add_argument("--ranks", nargs="*", type=int, default=[1, 8, 64, 256])
    ap.add_argument("--core-shapes", nargs="*", default=None, help="MxKxN of the core passes (default: "
                    + " ".join("x".join(map(str, s)) for s in CORE_SHAPES) + ")")
    ap.add_argument("--quant-shapes", nargs="*", default=None, help="OUTxINxBLOCKSIZE of the 4-bit kernels")
    ap.add_argument("--adapters", default="fp32", choices=["fp32", "bf16", "fp16"], help="lora_A/lora_B dtype")
    ap.add_argument("--quant-kinds", nargs="*", default=["nf4", "nf4-nested", "int4"])
    ap.add_argument("--bench", metavar="ARGS", help="with --only bench: the `fastpeft bench` arguments whose "
                    "compile-only warm-up to replay (e.g. \"--preset tiny --dtype bf16\")")
    args = ap.parse_args()
    dtypes = [{"bf16": BF16, "fp16": FP16, "fp32": FP32}[d] for d in args.dtypes]
    t0 = time.time()
    if "core" in args.only:
        shapes = [tuple(map(int, s.split("x"))) for s in args.core_shapes] if args.core_shapes else CORE_SHAPES
        core(args.all, dtypes, args.ranks, shapes, {"bf16": BF16, "fp16": FP16, "fp32": FP32}[args.adapters])
    if "quant4" in args.only:
        qs = [tuple(map(int, s.split("x"))) for s in args.quant_shapes] if args.quant_shapes else QUANT_SHAPES
        quant4(args.all, dtypes, qs, tuple(args.quant_kinds))
    if "mixed" in args.only:
        mixed(args.all, dtypes)
    if "untuned" in args.only:
        untuned(dtypes, args.ranks)
    from fastpeft.benchmarking import triton_cache_entries

    cache_before = triton_cache_entries()
    for mode in ("bench", "bench-tuned"):
        if mode in args.only:
            # bench: the compile-only warm-up (FASTPEFT_AUTOTUNE=warm); bench-tuned: the timed run's autotuner
            # path (every pruned config "timed" at 1 ms). Run bench-tuned after a bench run into the same
            # TRITON_CACHE_DIR: "new in the on-disk cache: 0" means the warm-up compiled every key it looks up.
            if mode == "bench-tuned":
                os.environ["FASTPEFT_AUTOTUNE"] = "1"
            rc = bench(args.bench or "--preset tiny", compile_only=mode == "bench")
            print(f"(fastpeft bench exited {rc}: its checks read outputs the stand-in driver never computes)")
    ok = [r for r in RECORDS if r["ok"]]
    bad = [r for r in RECORDS if not r["ok"]]
    print("\n== summary ==")
    print(f"compiled {len(ok)} specializations in {time.time() - t0:.0f}s; failures: {len(bad)}; "
          f"new in the on-disk cache ({triton.knobs.cache.dir}): {triton_cache_entries() - cache_before}")
    by = {}
    for r in ok:
        k = r["kernel"]
        d = by.setdefault(k, dict(n=0, smem=0, regs=0, spill=0, over=0, scratch=0))
        d["scratch"] = max(d["scratch"], r["scratch"] or 0)
        d["n"] += 1
        d["smem"] = max(d["smem"], r["shared"])
        d["regs"] = max(d["regs"], r["regs"] or 0)
        d["spill"] = max(d["spill"], r["spill"] or 0)
        d["over"] += not r["fits"]
    print(f"{'kernel':<24} {'n':>4} {'max smem':>9} {'over 227K':>9} {'max regs':>8} {'max stack':>9} {'scratch':>7}")
    for k, d in sorted(by.items()):
        print(f"{k:<24} {d['n']:>4} {d['smem']:>9} {d['over']:>9} {d['regs']:>8} {d['spill']:>9} {d['scratch']:>7}")
    for r in ok:
        if not r["fits"]:
            print(f"OVER SMEM {r['kernel']} {r['shared']} B [{r['tag']}]")
    need_alloc = sorted({r["kernel"] for r in ok if r["scratch"]})
    print("kernels needing triton.set_allocator (global scratch > 0):", need_alloc or "none")
    for r in bad:
        print(f"FAILED {r['kernel']} [{r['tag']}]: {r['err'][:400]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
