"""Compile every kernel for real GPUs (sm90 Hopper, sm80 Ampere) — no GPU needed.

The interpreter runs Python semantics and forgives what the compiler refuses
(a global read without ``tl.constexpr`` passed the interpreter and failed
here). ``triton.compile`` lowers a kernel to a cubin with the ptxas shipped in
the Triton wheel, so this runs on a CPU-only machine. One config per kernel
variant by default; ``FASTPEFT_AOT_ALL=1`` compiles every autotune config
(a few minutes). Whether a config fits in shared memory is only proven on the
GPU (the autotuner skips those that do not).
"""

import os
import subprocess
import sys

import pytest

ALL = os.environ.get("FASTPEFT_AOT_ALL", "0") == "1"

# Run in a subprocess: the kernels must be decorated without TRITON_INTERPRET, which
# conftest sets for this process.
SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import fastpeft.kernels.lora_gemm_tma as TM
import fastpeft.kernels.lora_linear as LL

ALL = sys.argv[1] == "1"
F32 = "*fp32"


def compile_one(fn, types, constexprs, cc, cfg):
    sig = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", cc, 32),
                   options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def pick(configs):
    return configs if ALL else configs[:1]


n = 0
for tdt in ("bf16", "fp16", "fp32"):
    dt = "*" + tdt
    prec = "ieee" if tdt == "fp32" else "tf32"  # fp32 activations without TF32, as torch's default
    exact = "ieee" if tdt == "fp32" else "tf32x3"  # fp32 results (xa, dA, dB) from half activations
    for cc in (90, 80):
        for cfg in pick(LL.gemm_configs(interpret=False)):
            for mask in (False, True):
                types = dict(x_ptr=dt, w_ptr=dt, bias_ptr=dt, l_ptr=F32, r_ptr=F32, out_ptr=dt, seed_ptr="*i64",
                             lora_scale="fp32", inv_keep="fp32")
                ce = dict(HAS_BIAS=True, HAS_LORA=True, MASK_LORA=mask, UPCAST=False, F32_PRECISION=prec,
                          BLOCK_R=16, **cfg.kwargs)
                compile_one(LL._lora_gemm_kernel, types, ce, cc, cfg)
                n += 1
        for cfg in pick(LL.down_configs(interpret=False)):
            for drop in (False, True):
                types = dict(x_ptr=dt, w_ptr=F32, out_ptr=F32, seed_ptr="*i64", out_scale="fp32")
                ce = dict(DROPOUT=drop, F32_PRECISION=exact, BLOCK_R=16, **cfg.kwargs)
                compile_one(LL._lora_down_kernel, types, ce, cc, cfg)
                n += 1
        for cfg in pick(LL.reduce_configs(interpret=False)):
            for drop, dbias, add_dx in ((True, False, True), (False, True, False)):
                types = dict(g_ptr=F32, x_ptr=dt, part_ptr=F32, bias_part_ptr=F32, seed_ptr="*i64", a_ptr=F32,
                             dx_ptr=dt, out_scale="fp32")
                ce = dict(DROPOUT=drop, DBIAS=dbias, ADD_DX=add_dx, F32_PRECISION=exact, BLOCK_R=16, **cfg.kwargs)
                compile_one(LL._lora_reduce_kernel, types, ce, cc, cfg)
                n += 1
    for cfg in pick(TM.tma_configs(interpret=False)):
        kw = cfg.kwargs
        bm, bn, bk, split = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["EPILOGUE_SPLIT"]
        for mask, w_kn in ((False, False), (True, True)):
            w_block = f"[{bk}, {bn}]" if w_kn else f"[{bn}, {bk}]"
            types = dict(x_desc=f"tensordesc<{tdt}[{bm}, {bk}]>", w_desc=f"tensordesc<{tdt}{w_block}>",
                         out_desc=f"tensordesc<{tdt}[{bm}, {bn // split}]>", bias_ptr=dt, l_ptr=F32, r_ptr=F32,
                         seed_ptr="*i64", lora_scale="fp32", inv_keep="fp32")
            ce = dict(W_KN=w_kn, HAS_BIAS=True, HAS_LORA=True, MASK_LORA=mask, UPCAST=False, F32_PRECISION=prec,
                      BLOCK_R=16, NUM_SMS=132, **kw)
            compile_one(TM._lora_gemm_tma_kernel, types, ce, 90, cfg)
            n += 1
# 4-bit decode GEMV (kernels/lora_gemv4bit.py): bnb NF4/FP4 (nested, one scale per row and step),
# bnb with blocks straddling rows and rows starting mid-byte, int4 groups; N = 1, 4 and 16 rows.
import fastpeft.kernels.lora_gemv4bit as GV  # noqa: E402

for cc in (90, 80):
    for cfg in pick(GV.gemv4bit_configs(interpret=False)):
        for tdt, block_n, quant, nested, aligned, even_rows, even_k in (
                ("bf16", 1, 0, True, True, True, True), ("fp16", 4, 1, False, True, True, False),
                ("fp32", 16, 0, False, False, False, False), ("bf16", 16, 0, True, True, True, True)):
            dt = "*" + tdt
            types = dict(x_ptr=dt, q_ptr="*u8", code_ptr=F32, s_ptr="*u8" if nested else ("*fp16" if quant else F32),
                         z_ptr="*u8", ncode_ptr=F32, nabs_ptr=F32, noff_ptr=F32, bias_ptr=dt, xa_ptr=F32, lb_ptr=F32,
                         ws_ptr=F32, cnt_ptr="*i32", y_ptr=dt, nested_offset="fp32", lora_scale="fp32")
            ce = dict(QUANT=quant, LOG_BS=6, LOG_NBS=8, NESTED=nested, OFFSET_PTR=nested, ROW_ALIGNED=aligned,
                      EVEN_ROWS=even_rows, HAS_BIAS=True, HAS_LORA=True, UPCAST=False,
                      F32_PRECISION="ieee" if tdt == "fp32" else "tf32", BLOCK_N=block_n, BLOCK_R=16,
                      EVEN_K=even_k, **cfg.kwargs)
            compile_one(GV._gemv4_kernel, types, ce, cc, cfg)
            n += 1
# Standalone 4-bit dequantization (kernels/dequant4bit.py): NF4/FP4 plain and nested, int4; every
# output dtype; FMA contraction off, as the launcher compiles it.
import fastpeft.kernels.dequant4bit as DQ  # noqa: E402

block, warps = DQ.dequant_block(interpret=False)
for cc in (90, 80):
    for odt, quant, nested in (("bf16", 0, True), ("fp16", 0, False), ("fp32", 0, True), ("bf16", 1, False),
                               ("fp32", 1, False)):
        types = dict(q_ptr="*u8", code_ptr=F32 if quant == 0 else "*fp16", s_ptr="*u8" if nested else
                     ("*fp16" if quant else F32), z_ptr="*u8" if quant else F32, ncode_ptr=F32, nabs_ptr=F32,
                     noff_ptr=F32, out_ptr="*" + odt, n="i64", in_features="i32", groups="i32")
        ce = dict(QUANT=quant, NESTED=nested, LOG_BS=6, LOG_NBS=8, GROUP=64, BLOCK=block, MANUAL_BF16=False)
        sig = {a: ("constexpr" if a in ce else types[a]) for a in DQ._dequant4_kernel.arg_names}
        triton.compile(ASTSource(fn=DQ._dequant4_kernel, signature=sig, constexprs=ce),
                       target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": warps, "num_stages": 1, "enable_fp_fusion": False})
        n += 1
# Mixed-adapter (SGMV-style) kernels (kernels/lora_mixed.py): gather down, scatter-add up, segmented reduce.
import fastpeft.kernels.lora_mixed as MX  # noqa: E402

for cc in (90, 80):
    for tdt in ("bf16", "fp16", "fp32"):
        dt = "*" + tdt
        prec = "ieee" if tdt == "fp32" else "tf32"
        exact = "ieee" if tdt == "fp32" else "tf32x3"
        meta = dict(idx_ptr="*i32", perm_ptr="*i64", scale_ptr=F32, thr_ptr="*i32", seed_ptr="*i64")
        for cfg in pick(LL.down_configs(interpret=False)):
            for drop in (False, True):
                compile_one(MX._mixed_down_kernel, dict(x_ptr=dt, w_ptr=F32, out_ptr=F32, **meta),
                            dict(DROPOUT=drop, F32_PRECISION=exact, BLOCK_R=16, **cfg.kwargs), cc, cfg)
                n += 1
        for cfg in pick(MX.up_configs(interpret=False)):
            for drop in (False, True):
                compile_one(MX._mixed_up_kernel, dict(l_ptr=F32, r_ptr=F32, out_ptr=dt, **meta),
                            dict(DROPOUT=drop, F32_PRECISION=prec, BLOCK_R=16, **cfg.kwargs), cc, cfg)
                n += 1
        for cfg in pick(LL.reduce_configs(interpret=False)):
            for drop in (False, True):
                types = dict(g_ptr=F32, x_ptr=dt, part_ptr=F32, perm_ptr="*i64", seg_ptr="*i64", scale_ptr=F32,
                             thr_ptr="*i32", seed_ptr="*i64")
                compile_one(MX._mixed_reduce_kernel, types,
                            dict(DROPOUT=drop, F32_PRECISION=exact, BLOCK_R=16, **cfg.kwargs), cc, cfg)
                n += 1
print("compiled", n)
'''


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_sm80():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "1" if ALL else "0"], env=env, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert "compiled" in proc.stdout
