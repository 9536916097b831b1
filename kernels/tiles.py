"""``@triton.jit`` helpers shared by the GEMM kernels."""

import triton
import triton.language as tl


@triton.jit
def rank_r_update(acc, l_ptr, r_ptr, rm, rn, R, stride_lm, stride_lr, stride_rr, stride_rn, lora_scale,
                  BLOCK_R: tl.constexpr, F32_PRECISION: tl.constexpr, OPERAND_DTYPE: tl.constexpr):
    """``acc + lora_scale · l[rm, :R] · r[:R, rn]``, R taken BLOCK_R at a time.

    ``rm``/``rn`` are in-bounds int64 row/column indices. The product's operands are cast to
    OPERAND_DTYPE (fp32 uses F32_PRECISION): folding the rank-r term into a bf16 GEMM's
    accumulator as one more K step of the same MMA type costs ≈ 1–3 % (TARGETS.md).
    """
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r_ok = offs_r < R - r0
        rr = (r0 + offs_r).to(tl.int64)
        lt = tl.load(l_ptr + rm[:, None] * stride_lm + rr[None, :] * stride_lr, mask=r_ok[None, :], other=0.0)
        rt = tl.load(r_ptr + rr[:, None] * stride_rr + rn[None, :] * stride_rn, mask=r_ok[:, None], other=0.0)
        lt = lt.to(tl.float32)
        rt = rt.to(tl.float32) * lora_scale
        if OPERAND_DTYPE == tl.float32:
            acc = tl.dot(lt, rt, acc, input_precision=F32_PRECISION)
        else:
            acc = tl.dot(lt.to(OPERAND_DTYPE), rt.to(OPERAND_DTYPE), acc)
    return acc
