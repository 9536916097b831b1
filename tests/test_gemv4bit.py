"""The 4-bit decode GEMV (kernels/lora_gemv4bit.py) against fp64 references.

bitsandbytes NF4/FP4: quantized on CPU with ``bitsandbytes.functional.quantize_4bit`` and
compared with an fp64 product on ``dequantize_4bit`` of the same bytes. fastpeft int4: quantized
by a small local helper following the layout. Interpreter tests (CPU); the gpu-marked ones run
the compiled kernel at decode shapes.
"""

import pytest
import torch
import torch.nn.functional as F

import fastpeft.kernels as K
from fastpeft.kernels import lora_gemv4bit as G
from helpers import assert_rel, assert_rule

bnbf = pytest.importorskip("bitsandbytes.functional")

pytestmark = pytest.mark.interp

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _bnb_dequant64(q, st):
    """fp64 W from bitsandbytes' own dequantization of (q, st).

    bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` blocks each row separately when
    ``in % blocksize != 0`` (and ``in`` is even), which contradicts its own ``quantize_4bit`` and the
    CUDA kernels (blocks over the flattened tensor; the error reaches the size of W). There the
    reference is bnb's pure-torch implementation of the same op (its ``default`` backend).
    """
    cols = st.shape[-1]
    if q.is_cuda or cols % st.blocksize == 0 or cols % 2:
        return bnbf.dequantize_4bit(q, st).double().cpu()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset if st.nested else st.absmax
    return _dequantize_4bit_compute(q.reshape(-1).view(torch.uint8), absmax.float(), st.code, st.blocksize,
                                    st.shape, torch.float32).double()


def _bnb_quant(out_f, in_f, blocksize, quant_type, nested, seed=0, device="cpu", storage=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    q, st = bnbf.quantize_4bit(w.to(device), blocksize=blocksize, quant_type=quant_type,
                               compress_statistics=nested, quant_storage=storage)
    w64 = _bnb_dequant64(q, st)
    # Independent of bnb's dequantization: the weights are W up to 4-bit rounding.
    assert (w64 - w.double()).abs().max() <= 0.35 * w.abs().max()
    return q, st, w64


def _nested_kwargs(st, offset_as_tensor=True):
    if not st.nested:
        return {}
    return dict(nested_code=st.state2.code, nested_absmax=st.state2.absmax, nested_blocksize=st.state2.blocksize,
                nested_offset=st.offset if offset_as_tensor else float(st.offset))


def _inputs(n, in_f, out_f, r, dtype, bias, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g).to(device, dtype)
    b = torch.randn(out_f, generator=g).to(device, dtype) if bias else None
    xa = torch.randn(n, r, generator=g).to(device) if r else None
    lb = (torch.randn(out_f, r, generator=g) / max(r, 1) ** 0.5).to(device) if r else None
    return x, b, xa, lb


def _ref64(x, w64, b, xa, lb, scale):
    y = x.double().cpu() @ w64.t()
    if b is not None:
        y = y + b.double().cpu()
    if xa is not None:
        y = y + scale * (xa.double().cpu() @ lb.double().cpu().t())
    return y


def _lowp(x, w64, b, xa, lb, scale):
    """Plain PyTorch in x's precision: the yardstick of the tolerance rule."""
    y = F.linear(x.cpu(), w64.to(x.dtype), None if b is None else b.cpu())
    if xa is not None:
        y = y + (scale * xa.cpu() @ lb.cpu().t()).to(x.dtype)
    return y


def _check(y, x, w64, b, xa, lb, scale, name=""):
    ref = _ref64(x, w64, b, xa, lb, scale)
    assert y.dtype == x.dtype and y.shape == ref.shape
    if x.dtype == torch.float32:
        assert_rel(y.cpu(), ref, TOL[x.dtype], name)
    else:
        # Triton's interpreter (3.9) truncates fp32 → bf16 on the cast before the store (1 ulp where
        # torch rounds to nearest, ½ ulp): twice the factor there; compiled GPU code rounds to nearest.
        factor = 4.0 if x.dtype == torch.bfloat16 and not y.is_cuda else 2.0
        assert_rule(y.cpu(), ref, _lowp(x, w64, b, xa, lb, scale), factor, name)
        assert_rel(y.cpu(), ref, TOL[x.dtype], name)


# (N, out, in, blocksize, quant_type, nested, dtype, bias, r): in % blocksize ≠ 0 (blocks straddle
# rows; odd in: rows start mid-byte), in % blocksize = 0 (one scale per row and step), N = 1, 3, 16.
BNB_CASES = [
    (1, 37, 128, 64, "nf4", False, torch.float32, True, 4),
    (1, 37, 128, 64, "nf4", True, torch.float32, False, 0),
    (3, 29, 96, 64, "fp4", True, torch.float32, True, 8),
    (16, 23, 64, 32, "nf4", True, torch.float32, True, 5),
    (1, 19, 45, 32, "nf4", True, torch.float32, True, 3),
    (3, 21, 45, 128, "fp4", False, torch.float32, False, 16),
    (16, 17, 77, 64, "fp4", True, torch.float32, True, 0),
    (2, 33, 256, 256, "nf4", True, torch.float32, True, 2),
    (1, 9, 100, 4096, "nf4", False, torch.float32, True, 1),
    (1, 35, 160, 32, "fp4", True, torch.float16, True, 6),
    (3, 26, 70, 64, "nf4", True, torch.float16, False, 4),
    (16, 40, 128, 128, "nf4", True, torch.float16, True, 8),
    (1, 31, 96, 64, "nf4", True, torch.bfloat16, True, 4),
    (3, 27, 51, 32, "fp4", False, torch.bfloat16, True, 0),
    (16, 18, 64, 64, "nf4", True, torch.bfloat16, False, 3),
]


@pytest.mark.parametrize("case", BNB_CASES, ids=lambda c: "N{}_{}x{}_bs{}_{}{}_{}{}_r{}".format(
    c[0], c[1], c[2], c[3], c[4], "_dq" if c[5] else "", str(c[6])[6:], "_bias" if c[7] else "", c[8]))
def test_bnb_vs_fp64(case):
    n, out_f, in_f, bs, qt, nested, dtype, bias, r = case
    q, st, w64 = _bnb_quant(out_f, in_f, bs, qt, nested)
    x, b, xa, lb = _inputs(n, in_f, out_f, r, dtype, bias)
    y = K.lora_gemv_4bit(x, q, st.absmax, st.code, st.blocksize, out_f, in_f, bias=b, xa=xa, lora_B=lb, scale=1.7,
                         **_nested_kwargs(st))
    _check(y, x, w64, b, xa, lb, 1.7)
    if r:  # the adapter changes the output (a zero B would make the LoRA check vacuous)
        base = K.lora_gemv_4bit(x, q, st.absmax, st.code, st.blocksize, out_f, in_f, bias=b, **_nested_kwargs(st))
        assert (y.double() - base.double()).abs().max() > 1e-2


def test_code_tables_are_bitsandbytes():
    """The tables the tests pass are bnb's own (get_4bit_type), and its nibble order is ours."""
    for qt in ("nf4", "fp4"):
        q, st, w64 = _bnb_quant(5, 37, 64, qt, False)
        assert torch.equal(st.code.cpu(), bnbf.get_4bit_type(qt, device="cpu"))
        flat = q.reshape(-1)
        codes = torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[: 5 * 37].long()
        blocks = torch.arange(5 * 37) // 64
        assert torch.equal((st.code[codes] * st.absmax[blocks]).double().view(5, 37), w64)


def _int4_quant(w, group):
    """Group-wise asymmetric int4 in fastpeft's layout (what the quantizer writes)."""
    out_f, in_f = w.shape
    groups = -(-in_f // group)
    pad = torch.nn.functional.pad(w, (0, groups * group - in_f))
    gw = pad.view(out_f, groups, group)
    valid = (torch.arange(groups * group) < in_f).view(1, groups, group)
    lo = torch.where(valid, gw, torch.inf).amin(-1).clamp(max=0)
    hi = torch.where(valid, gw, -torch.inf).amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-8).half()
    zeros = (-lo / scales.float()).round().clamp(0, 15).to(torch.uint8)
    q = (gw / scales.float()[..., None] + zeros[..., None].float()).round().clamp(0, 15).to(torch.uint8)
    q = q.view(out_f, -1)[:, :in_f]
    if in_f % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    w64 = (q[:, :in_f].double() - zeros.double().repeat_interleave(group, 1)[:, :in_f]) \
        * scales.double().repeat_interleave(group, 1)[:, :in_f]
    return packed.contiguous(), scales, zeros, w64


INT4_CASES = [
    (1, 37, 128, 32, torch.float32, True, 4),
    (3, 29, 200, 64, torch.float32, False, 8),
    (16, 21, 96, 128, torch.float32, True, 3),
    (1, 19, 45, 32, torch.float32, True, 0),
    (3, 25, 130, 64, torch.float16, True, 5),
    (1, 23, 64, 32, torch.bfloat16, False, 2),
    (16, 17, 128, 64, torch.bfloat16, True, 4),
]


@pytest.mark.parametrize("case", INT4_CASES, ids=lambda c: "N{}_{}x{}_g{}_{}{}_r{}".format(
    c[0], c[1], c[2], c[3], str(c[4])[6:], "_bias" if c[5] else "", c[6]))
def test_int4_vs_fp64(case):
    n, out_f, in_f, group, dtype, bias, r = case
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(3)) / in_f**0.5
    packed, scales, zeros, w64 = _int4_quant(w, group)
    assert (w64 - w.double()).abs().max() < 0.2  # the helper quantizes what it claims to
    x, b, xa, lb = _inputs(n, in_f, out_f, r, dtype, bias)
    y = K.lora_gemv_int4(x, packed, scales, zeros, group, out_f, in_f, bias=b, xa=xa, lora_B=lb, scale=0.8)
    _check(y, x, w64, b, xa, lb, 0.8)


def _poisoned(t, fill, extra=64):
    """``t`` as the head of a longer buffer whose tail holds ``fill``: a read past t's end sees it."""
    buf = torch.full((t.numel() + extra,), fill, dtype=t.dtype)
    buf[: t.numel()] = t.reshape(-1)
    return buf[: t.numel()].view(t.shape)


@pytest.mark.parametrize("nested", [False, True])
def test_tail_step_reads_no_scale_past_the_end(nested):
    """in % BLOCK_K ≠ 0 with blocks straddling rows: the tail step's columns past ``in`` must not read
    scales past the array (NaN there would turn a row into NaN through NaN·0)."""
    cfg = G._gcfg(16, 32, 1, 4, 1)
    q, st, w64 = _bnb_quant(19, 45, 32, "nf4", nested)
    x, b, xa, lb = _inputs(1, 45, 19, 3, torch.float32, True)
    kw = _nested_kwargs(st)
    if nested:
        kw["nested_absmax"] = _poisoned(kw["nested_absmax"], float("nan"))
        absmax = _poisoned(st.absmax, 255)
    else:
        absmax = _poisoned(st.absmax, float("nan"))
    y = K.lora_gemv_4bit(x, q, absmax, st.code, 32, 19, 45, bias=b, xa=xa, lora_B=lb, scale=1.3, config=cfg, **kw)
    _check(y, x, w64, b, xa, lb, 1.3, "bnb")
    packed, scales, zeros, w64 = _int4_quant(torch.randn(19, 45), 32)
    y = K.lora_gemv_int4(x, packed, _poisoned(scales, float("nan")), _poisoned(zeros, 255), 32, 19, 45, bias=b,
                         xa=xa, lora_B=lb, scale=1.3, config=cfg)
    _check(y, x, w64, b, xa, lb, 1.3, "int4")


@pytest.mark.parametrize("cfg", [G._gcfg(16, 32, 1, 4, 1), G._gcfg(32, 64, 3, 4, 1), G._gcfg(16, 128, 2, 4, 1)],
                         ids=lambda c: "{BLOCK_OUT}x{BLOCK_K}_s{SPLIT_K}".format(**c.kwargs))
def test_each_config_forced(cfg):
    """Every (tile, split) layout gives the same function within tolerance, bnb and int4."""
    q, st, w64 = _bnb_quant(41, 192, 64, "nf4", True)
    x, b, xa, lb = _inputs(3, 192, 41, 4, torch.float32, True)
    y = K.lora_gemv_4bit(x, q, st.absmax, st.code, 64, 41, 192, bias=b, xa=xa, lora_B=lb, scale=2.0,
                         config=cfg, **_nested_kwargs(st))
    _check(y, x, w64, b, xa, lb, 2.0, "bnb")
    packed, scales, zeros, w64 = _int4_quant(torch.randn(41, 192), 64)
    y = K.lora_gemv_int4(x, packed, scales, zeros, 64, 41, 192, bias=b, xa=xa, lora_B=lb, scale=2.0, config=cfg)
    _check(y, x, w64, b, xa, lb, 2.0, "int4")


def test_deterministic_and_counters_reset():
    q, st, _ = _bnb_quant(45, 128, 64, "nf4", True)
    x, b, xa, lb = _inputs(1, 128, 45, 4, torch.float32, True)
    ys = [K.lora_gemv_4bit(x, q, st.absmax, st.code, 64, 45, 128, bias=b, xa=xa, lora_B=lb, **_nested_kwargs(st))
          for _ in range(2)]
    assert torch.equal(ys[0], ys[1])
    assert all(int(c.count_nonzero()) == 0 for c in G._COUNTERS.values())


def test_strided_inputs_equal_contiguous():
    q, st, w64 = _bnb_quant(27, 64, 32, "fp4", False)
    g = torch.Generator().manual_seed(5)
    x_big = torch.randn(64, 6, generator=g)
    x = x_big.t()[1:4]  # (3, 64), column-major strides
    xa = torch.randn(4, 3, generator=g).t()
    lb = torch.randn(4, 27, generator=g).t()
    args = (st.absmax, st.code, 32, 27, 64)
    y = K.lora_gemv_4bit(x, q, *args, xa=xa, lora_B=lb, scale=0.5)
    y_c = K.lora_gemv_4bit(x.contiguous(), q, *args, xa=xa.contiguous(), lora_B=lb.contiguous(), scale=0.5)
    assert torch.equal(y, y_c)
    _check(y, x, w64, None, xa, lb, 0.5)


def test_quant_storage_and_float_offset():
    """bnb's quant_storage (bytes held in another dtype) and a float offset read the same weights."""
    q, st, w64 = _bnb_quant(21, 96, 64, "nf4", True, storage=torch.bfloat16)
    assert q.dtype == torch.bfloat16
    x, b, _, _ = _inputs(1, 96, 21, 0, torch.float32, True)
    y = K.lora_gemv_4bit(x, q, st.absmax, st.code, 64, 21, 96, bias=b, **_nested_kwargs(st))
    y_f = K.lora_gemv_4bit(x, q, st.absmax, st.code, 64, 21, 96, bias=b, **_nested_kwargs(st, False))
    assert torch.equal(y, y_f)
    _check(y, x, w64, b, None, None, 1.0)


def test_many_rows_and_empty():
    q, st, w64 = _bnb_quant(13, 64, 64, "nf4", False)
    x, b, xa, lb = _inputs(20, 64, 13, 2, torch.float32, True)  # > 16 rows: two launches
    before = K.LAUNCHES["lora_gemv_4bit"]
    y = K.lora_gemv_4bit(x, q, st.absmax, st.code, 64, 13, 64, bias=b, xa=xa, lora_B=lb)
    assert K.LAUNCHES["lora_gemv_4bit"] - before == 2
    _check(y, x, w64, b, xa, lb, 1.0)
    empty = K.lora_gemv_4bit(x[:0], q, st.absmax, st.code, 64, 13, 64)
    assert empty.shape == (0, 13)


def test_errors():
    q, st, _ = _bnb_quant(8, 64, 64, "nf4", False)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="power of two"):
        K.lora_gemv_4bit(x, q, st.absmax, st.code, 48, 8, 64)
    with pytest.raises(ValueError, match="both or neither"):
        K.lora_gemv_4bit(x, q, st.absmax, st.code, 64, 8, 64, xa=torch.randn(1, 2))
    with pytest.raises(ValueError, match="needs"):
        K.lora_gemv_4bit(x, q[:10], st.absmax, st.code, 64, 8, 64)
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        K.lora_gemv_4bit(torch.randn(1, 63), q, st.absmax, st.code, 64, 8, 64)
    with pytest.raises(TypeError, match="uint8"):
        K.lora_gemv_4bit(x, q, st.absmax, st.code, 64, 8, 64, nested_code=st.code, nested_absmax=st.absmax)


def test_prune_keeps_steps_inside_blocks():
    configs = G.gemv4bit_configs(interpret=False)
    kept = G._prune(configs, {"IN": 4096}, LOG_BS=6, ROW_ALIGNED=True, BLOCK_N=1)
    assert kept and all(c.kwargs["BLOCK_K"] <= 64 for c in kept)
    assert len(G._prune(configs, {"IN": 4096}, LOG_BS=6, ROW_ALIGNED=False, BLOCK_N=1)) == len(configs)
    assert all(c.kwargs["BLOCK_K"] <= 64 for c in G._prune(configs, {"IN": 4096}, LOG_BS=8, ROW_ALIGNED=False,
                                                            BLOCK_N=16))
    tiny = G._prune(configs, {"IN": 64}, LOG_BS=6, ROW_ALIGNED=True, BLOCK_N=1)
    assert tiny and all(c.kwargs["SPLIT_K"] == 1 for c in tiny)


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 14336)])
def test_gpu_decode_shapes_every_config(shape, n):
    in_f, out_f = shape
    q, st, w64 = _bnb_quant(out_f, in_f, 64, "nf4", True, device="cuda")
    x, b, xa, lb = _inputs(n, in_f, out_f, 16, torch.bfloat16, True, device="cuda")
    ref = _ref64(x, w64, b, xa, lb, 2.0)
    forced = G.gemv4bit_configs() if shape == (4096, 4096) else []  # each config is a compile: one shape
    for cfg in forced:
        y = K.lora_gemv_4bit(x, q, st.absmax, st.code, 64, out_f, in_f, bias=b, xa=xa, lora_B=lb, scale=2.0,
                             config=cfg, **_nested_kwargs(st))
        y2 = K.lora_gemv_4bit(x, q, st.absmax, st.code, 64, out_f, in_f, bias=b, xa=xa, lora_B=lb, scale=2.0,
                              config=cfg, **_nested_kwargs(st))
        assert torch.equal(y, y2), cfg  # split-K reduction in a fixed order
        assert_rule(y.cpu(), ref, _lowp(x, w64, b, xa, lb, 2.0), 2.0, str(cfg))
    y = K.lora_gemv_4bit(x, q, st.absmax, st.code, 64, out_f, in_f, bias=b, xa=xa, lora_B=lb, scale=2.0,
                         **_nested_kwargs(st))
    assert_rel(y.cpu(), ref, TOL[torch.bfloat16], "autotuned")


@pytest.mark.gpu
def test_gpu_error_not_worse_than_bnb_gemv():
    """TESTING.md's band, one-sided: our error against fp64 at most bnb's gemv_4bit's (+5 %)."""
    q, st, w64 = _bnb_quant(4096, 4096, 64, "nf4", True, device="cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    st.dtype = torch.bfloat16
    ref = x.double().cpu() @ w64.t()
    ours = K.lora_gemv_4bit(x, q, st.absmax, st.code, 64, 4096, 4096, **_nested_kwargs(st))
    theirs = bnbf.gemv_4bit(x, q.t(), state=st)
    err_ours = (ours.double().cpu() - ref).norm() / ref.norm()
    err_bnb = (theirs.double().cpu() - ref).norm() / ref.norm()
    assert err_ours <= 1.05 * err_bnb, (err_ours, err_bnb)


@pytest.mark.gpu
def test_gpu_int4_decode():
    in_f, out_f = 4096, 4096
    w = torch.randn(out_f, in_f) / in_f**0.5
    packed, scales, zeros, w64 = _int4_quant(w, 128)
    x, b, xa, lb = _inputs(1, in_f, out_f, 16, torch.bfloat16, True, device="cuda")
    y = K.lora_gemv_int4(x, packed.cuda(), scales.cuda(), zeros.cuda(), 128, out_f, in_f, bias=b, xa=xa, lora_B=lb,
                         scale=2.0)
    ref = _ref64(x, w64, b, xa, lb, 2.0)
    assert_rule(y.cpu(), ref, _lowp(x, w64, b, xa, lb, 2.0), 2.0, "int4")
