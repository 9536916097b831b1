"""The Triton kernels themselves (interpreted on CPU), against an independent fp64 reference."""

import pytest
import torch
import triton
import triton.language as tl

import fastpeft.kernels as K
from fastpeft import reference
from fastpeft.kernels import configs
from fastpeft.kernels.philox import keep_tile, philox4x32
from helpers import DEVICE, assert_rel, assert_rule, lora_grads64, lora_ref64

# Every test here but the gpu-marked ones launches kernels on CPU tensors (interpreter).
pytestmark = pytest.mark.interp

# (N, in, out, r, p, dtype, fan_in_fan_out, bias): odd sizes that straddle the blocks.
CASES = [
    (45, 77, 53, 8, 0.0, torch.float32, False, True),
    (45, 77, 53, 8, 0.3, torch.float32, False, True),
    (1, 33, 40, 1, 0.1, torch.float32, True, False),
    (0, 31, 17, 4, 0.1, torch.float32, False, True),
    (70, 50, 90, 40, 0.2, torch.float32, False, False),
    (33, 47, 31, 3, 0.0, torch.float16, False, True),
    (66, 45, 70, 16, 0.25, torch.float16, True, True),
    (5, 123, 19, 64, 0.5, torch.float16, False, True),
    (17, 20, 24, 256, 0.1, torch.float32, False, True),
]


def _make(N, fin, fout, r, dtype, fifo, bias, seed_value=1234):
    g = torch.Generator().manual_seed(N * 1000 + fin * 7 + r)
    x = torch.randn(N, fin, generator=g).to(dtype)
    W = (torch.randn((fin, fout) if fifo else (fout, fin), generator=g) / fin**0.5).to(dtype)
    b = torch.randn(fout, generator=g).to(dtype) if bias else None
    A = torch.randn(r, fin, generator=g) / fin**0.5
    B = torch.randn(fout, r, generator=g) / r**0.5
    dy = torch.randn(N, fout, generator=g).to(dtype)
    return x, W, b, A, B, dy, torch.tensor([seed_value], dtype=torch.int64)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}_{}x{}_r{}_p{}_{}{}{}".format(
    c[0], c[1], c[2], c[3], c[4], str(c[5])[6:], "_fifo" if c[6] else "", "_bias" if c[7] else ""))
def test_forward_backward_vs_fp64(case):
    N, fin, fout, r, p, dtype, fifo, bias = case
    x, W, b, A, B, dy, seed = _make(N, fin, fout, r, dtype, fifo, bias)
    scale, thr = 1.7, reference.dropout_threshold(p)
    y, xa = K.lora_linear_forward(x, W, b, A, B, seed, scale, p, fifo, thr)
    grads = K.lora_linear_backward(dy, x, W, A, B, xa, seed, scale, p, fifo, thr, need_dbias=bias)
    assert y.dtype == dtype and y.shape == (N, fout) and xa.shape == (N, r) and xa.dtype == torch.float32

    y64 = lora_ref64(x, W, b, A, B, scale, p, seed, fifo)
    g64 = lora_grads64(dy, x, W, A, B, scale, p, seed, fifo, bias)
    if N == 0:
        assert y.numel() == 0 and grads[0].numel() == 0
        assert torch.count_nonzero(grads[1]) == 0 and torch.count_nonzero(grads[2]) == 0
        return
    names = ("dx", "dA", "dB", "dbias")
    if dtype == torch.float32:
        assert_rel(y, y64, 1e-5, "y")
        for name, ours, ref in zip(names, grads, g64):
            if ref is not None:
                assert_rel(ours, ref, 1e-5, name)
    else:
        # same-precision PyTorch as the yardstick (TESTING.md tolerance rule)
        y_lp, xa_lp = reference.lora_linear_forward(x, W, b, A, B, seed, scale, p, fifo)
        g_lp = reference.lora_linear_backward(dy, x, W, A, B, xa_lp, seed, scale, p, fifo, need_dbias=bias)
        assert_rule(y, y64, y_lp, 2.0, "y")
        for name, ours, ref, lp in zip(names, grads, g64, g_lp):
            if ref is not None:
                assert_rule(ours, ref, lp, 3.0, name)
                assert_rel(ours, ref, 2e-3, name)


def test_bf16_upcast_in_interpreter():
    """bf16 runs in the interpreter through the upcast helper and lands within bf16 error."""
    x, W, b, A, B, dy, seed = _make(37, 41, 29, 8, torch.bfloat16, False, True)
    y, xa = K.lora_linear_forward(x, W, b, A, B, seed, 2.0, 0.1, False, reference.dropout_threshold(0.1))
    assert y.dtype == torch.bfloat16
    assert_rel(y, lora_ref64(x, W, b, A, B, 2.0, 0.1, seed), 1e-2, "y")


@pytest.mark.parametrize("seed_value", [0, 123456789012345, 2**62 + 17])
def test_philox_matches_reference_and_tl_randint4x(seed_value):
    @triton.jit
    def kern(out_ours, out_tl, seed_ptr, off0, BLOCK: tl.constexpr):
        offs = off0 + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seed_ptr)
        lo = (offs & 0xFFFFFFFF).to(tl.uint32)
        hi = ((offs >> 32) & 0xFFFFFFFF).to(tl.uint32)
        ours = philox4x32(seed, lo, hi, lo * 0, lo * 0)
        theirs = tl.randint4x(seed, offs)
        for i in tl.static_range(4):
            tl.store(out_ours + i * 4 * BLOCK + idx, ours[i].to(tl.int32, bitcast=True))
            tl.store(out_tl + i * 4 * BLOCK + idx, theirs[i].to(tl.int32, bitcast=True))

    for off0 in (0, 2**32 - 40, 2**40 + 3):  # crosses the 32-bit boundary of the counter
        ours, theirs = torch.empty(4, 128, dtype=torch.int32), torch.empty(4, 128, dtype=torch.int32)
        kern[(4,)](ours, theirs, torch.tensor([seed_value]), off0, BLOCK=32)
        offs = off0 + torch.arange(128)
        ref = reference.philox4x32(seed_value, offs & 0xFFFFFFFF, offs >> 32, offs * 0, offs * 0)
        assert torch.equal(ours.to(torch.int64) & 0xFFFFFFFF, torch.stack(ref))
        assert torch.equal(ours, theirs)


def test_keep_tile_matches_reference_mask():
    """The in-kernel tile mask equals the PyTorch replay for odd rows/columns and high row indices."""
    @triton.jit
    def kern(out, seed_ptr, row0, n_cols, stride, threshold, BM: tl.constexpr, BN: tl.constexpr):
        rows = row0 + tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        keep = keep_tile(tl.load(seed_ptr), rows, tl.program_id(1) * BN, BN, threshold)
        ptrs = out + (rows - row0)[:, None] * stride + cols[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=cols[None, :] < n_cols)

    thr = reference.dropout_threshold(0.37)
    for row0 in (0, 2**32 - 5):
        out = torch.zeros(48, 45, dtype=torch.int8)
        kern[(3, 3)](out, torch.tensor([77]), row0, 45, out.stride(0), thr, BM=16, BN=16)
        want = reference.dropout_keep_rows(77, row0 + torch.arange(48), 45, 0.37)
        assert torch.equal(out.bool(), want)


def test_dropout_rate_in_kernel():
    """Through the down kernel with x = 1, A = 1: kept count / elements ≈ 1 − p over 1M elements."""
    p, M, Kd = 0.3, 1024, 1024
    x = torch.ones(M, Kd)
    ones = torch.ones(1, Kd)
    seed = torch.tensor([42], dtype=torch.int64)
    kept = K.lora_down(x, ones, seed=seed, threshold=reference.dropout_threshold(p), dropout=True)
    frac_dropped = 1.0 - kept.sum().item() / (M * Kd)
    assert abs(frac_dropped - p) < 0.01
    # the same mask as the reference generator, row by row
    ref_rows = reference.dropout_keep_mask(seed, M, Kd, p).sum(1).float()
    assert torch.equal(kept[:, 0], ref_rows)


def _forced(fn, cfgs, *args, **kwargs):
    return [fn(*args, **kwargs, config=c) for c in cfgs]


def test_every_gpu_config_within_tolerance():
    """Each GPU autotune config, forced alone (interpreted), gives the reference result."""
    x, W, b, A, B, dy, seed = _make(45, 70, 53, 20, torch.float32, False, True)
    thr = reference.dropout_threshold(0.2)
    want = lora_ref64(x, W, b, A, B, 1.0, 0.0)
    for y in _forced(K.lora_gemm, configs.gemm_configs(interpret=False), x, W, b,
                     K.lora_down(x, A), B.t(), lora_scale=1.0):
        assert_rel(y, want, 1e-5, "gemm")
    xa_ref = K.lora_down(x, A, seed=seed, threshold=thr, dropout=True)
    for xa in _forced(K.lora_down, configs.down_configs(interpret=False), x, A, seed=seed, threshold=thr,
                      dropout=True):
        assert_rel(xa, xa_ref, 1e-5, "down")
    dS = torch.randn(45, 20)
    ref = dS.double().t() @ x.double()
    for part, _ in _forced(K.lora_reduce, configs.reduce_configs(interpret=False), dS, x):
        assert_rel(part, ref, 1e-5, "reduce")
    # the in-place dx variant: every config updates each dx element exactly once
    keep = reference.dropout_keep_mask(seed, 45, 70, 0.2).double()
    dx0 = torch.randn(45, 70)
    want_dx = dx0.double() + keep * (dS.double() @ A.double()) * 1.25
    for cfg in configs.reduce_configs(interpret=False):
        dx = dx0.clone()
        part, _ = K.lora_reduce(dS, x, out_scale=1.25, seed=seed, threshold=thr, dropout=True, add_dx=(A, dx),
                                config=cfg)
        assert_rel(dx, want_dx, 1e-5, f"dx {cfg}")
        assert_rel(part, 1.25 * dS.double().t() @ (x.double() * keep), 1e-5, f"dA {cfg}")


def test_repeat_runs_identical():
    x, W, b, A, B, dy, seed = _make(45, 77, 53, 8, torch.float32, False, True)
    thr = reference.dropout_threshold(0.1)
    runs = []
    for _ in range(2):
        y, xa = K.lora_linear_forward(x, W, b, A, B, seed, 2.0, 0.1, False, thr)
        runs.append((y, xa, *K.lora_linear_backward(dy, x, W, A, B, xa, seed, 2.0, 0.1, False, thr,
                                                      need_dbias=True)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_strided_inputs_bit_identical():
    """Sliced x, transposed W view, non-contiguous A/B and dy: same bits as contiguous copies."""
    x, W, b, A, B, dy, seed = _make(40, 60, 50, 8, torch.float32, False, True)
    thr = reference.dropout_threshold(0.2)
    x_nc = torch.randn(40, 120)[:, ::2]
    x_nc.copy_(x)
    A_nc = A.t().contiguous().t()
    B_nc = B.t().contiguous().t()
    dy_nc = dy.t().contiguous().t()
    assert not (x_nc.is_contiguous() or A_nc.is_contiguous() or B_nc.is_contiguous() or dy_nc.is_contiguous())
    y1, xa1 = K.lora_linear_forward(x, W, b, A, B, seed, 2.0, 0.2, False, thr)
    y2, xa2 = K.lora_linear_forward(x_nc, W, b, A_nc, B_nc, seed, 2.0, 0.2, False, thr)
    assert torch.equal(y1, y2) and torch.equal(xa1, xa2)
    g1 = K.lora_linear_backward(dy, x, W, A, B, xa1, seed, 2.0, 0.2, False, thr, need_dbias=True)
    g2 = K.lora_linear_backward(dy_nc, x_nc, W, A_nc, B_nc, xa2, seed, 2.0, 0.2, False, thr, need_dbias=True)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


@pytest.mark.gpu
def test_bf16_on_gpu_vs_fp64():
    torch.manual_seed(0)
    for N, fin, fout, r, p in [(4096, 1024, 1536, 16, 0.1), (1, 4096, 4096, 16, 0.0), (77, 45, 123, 64, 0.2)]:
        x = torch.randn(N, fin, device=DEVICE, dtype=torch.bfloat16)
        W = (torch.randn(fout, fin, device=DEVICE) / fin**0.5).to(torch.bfloat16)
        b = torch.randn(fout, device=DEVICE, dtype=torch.bfloat16)
        A = torch.randn(r, fin, device=DEVICE) / fin**0.5
        B = torch.randn(fout, r, device=DEVICE) / r**0.5
        dy = torch.randn(N, fout, device=DEVICE, dtype=torch.bfloat16)
        seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
        thr = reference.dropout_threshold(p)
        y, xa = K.lora_linear_forward(x, W, b, A, B, seed, 2.0, p, False, thr)
        grads = K.lora_linear_backward(dy, x, W, A, B, xa, seed, 2.0, p, False, thr, need_dbias=True)
        cpu = [t.cpu() for t in (x, W, b, A, B, dy)]
        y64 = lora_ref64(*cpu[:5], 2.0, p, seed.cpu())
        g64 = lora_grads64(cpu[5], cpu[0], cpu[1], cpu[3], cpu[4], 2.0, p, seed.cpu())
        y_lp, xa_lp = reference.lora_linear_forward(x, W, b, A, B, seed, 2.0, p, False)
        g_lp = reference.lora_linear_backward(dy, x, W, A, B, xa_lp, seed, 2.0, p, False, need_dbias=True)
        assert_rule(y.cpu(), y64, y_lp.cpu(), 2.0, "y")
        for name, ours, ref, lp in zip(("dx", "dA", "dB", "db"), grads, g64, g_lp):
            assert_rule(ours.cpu(), ref, lp.cpu(), 3.0, name)


@pytest.mark.gpu
def test_large_offsets_int64_on_gpu():
    """tokens × features > 2³¹: int64 offsets in loads, stores and dropout counters (sampled rows)."""
    N, fin, r = 70_000, 32_768, 16  # 2.29e9 elements, 4.6 GB in bf16
    x = torch.randn(N, fin, device=DEVICE, dtype=torch.bfloat16)
    A = torch.randn(r, fin, device=DEVICE) / fin**0.5
    seed = torch.tensor([11], dtype=torch.int64, device=DEVICE)
    thr = reference.dropout_threshold(0.1)
    xa = K.lora_down(x, A, seed=seed, threshold=thr, dropout=True, out_scale=1 / 0.9)
    rows = torch.tensor([0, 1, 65_535, 65_536, N - 1], device=DEVICE)
    keep = reference.dropout_keep_rows(seed.cpu(), rows.cpu(), fin, 0.1)
    ref = (x[rows].float().cpu() * keep / 0.9) @ A.cpu().t()
    assert_rel(xa[rows].cpu(), ref, 1e-3, "xa rows")
    # dA-shaped reduction over all 2.29e9 elements (p = 0; reference summed in row chunks)
    g = torch.randn(N, r, device=DEVICE) / 100
    dA, _ = K.lora_reduce(g, x)
    ref = sum(g[i:i + 8192].t() @ x[i:i + 8192].float() for i in range(0, N, 8192))
    assert_rel(dA, ref, 1e-3, "dA")
    del x, g
    # GEMMs whose output has > 2³¹ elements, with the rank-r term, on both Triton kernels
    dy = torch.randn(N, 64, device=DEVICE, dtype=torch.bfloat16)
    W = torch.randn(64, fin, device=DEVICE, dtype=torch.bfloat16)
    l = torch.randn(N, r, device=DEVICE)
    rr = torch.randn(r, fin, device=DEVICE)
    ref = dy[rows].float() @ W.float() + l[rows] @ rr
    for impl in ("pointer", "tma"):
        dx = K.lora_gemm(dy, W.t(), None, l, rr, impl=impl)
        assert_rel(dx[rows].float(), ref, 1e-2, f"dx rows ({impl})")
        del dx


TMA_CASES = [  # aligned feature sizes (TMA needs 16-byte rows), odd token counts
    (45, 72, 56, 8, 0.0, torch.float32, False, True),
    (45, 72, 56, 8, 0.3, torch.float16, False, True),
    (33, 64, 48, 3, 0.2, torch.float32, True, False),
    (1, 40, 24, 16, 0.1, torch.float16, True, True),
]


@pytest.mark.parametrize("case", [c for c in CASES + TMA_CASES if c[4] > 0], ids=lambda c: f"N{c[0]}_r{c[3]}")
def test_dx_dropout_in_gemm_epilogue(monkeypatch, case):
    """The other placement of dx's masked term (GEMM epilogue) gives the same gradients."""
    monkeypatch.setenv("FASTPEFT_DX_DROPOUT", "epilogue")
    test_forward_backward_vs_fp64(case)


def test_dx_dropout_placements_agree(monkeypatch):
    x, W, b, A, B, dy, seed = _make(45, 72, 56, 8, torch.float32, False, True)
    thr = reference.dropout_threshold(0.3)
    y, xa = K.lora_linear_forward(x, W, b, A, B, seed, 2.0, 0.3, False, thr)
    grads = {}
    for mode in ("reduce", "epilogue"):
        monkeypatch.setenv("FASTPEFT_DX_DROPOUT", mode)
        before = K.LAUNCHES["lora_reduce"]
        grads[mode] = K.lora_linear_backward(dy, x, W, A, B, xa, seed, 2.0, 0.3, False, thr, need_dA=False,
                                             need_dB=False)
        assert K.LAUNCHES["lora_reduce"] - before == (1 if mode == "reduce" else 0)
    assert grads["reduce"][1] is None
    assert_rel(grads["reduce"][0], grads["epilogue"][0], 1e-6, "dx")


@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: f"N{c[0]}_{c[1]}x{c[2]}_r{c[3]}_p{c[4]}")
def test_tma_path_vs_fp64(monkeypatch, case):
    """The Hopper kernel (persistent, TMA descriptors) in the interpreter, forward and backward."""
    monkeypatch.setenv("FASTPEFT_GEMM", "tma")
    before = K.LAUNCHES["lora_gemm_tma"]
    test_forward_backward_vs_fp64(case)
    assert K.LAUNCHES["lora_gemm_tma"] - before == 2  # forward GEMM and dgrad GEMM


def test_every_tma_config_within_tolerance():
    from fastpeft.kernels.lora_gemm_tma import tma_configs

    x, W, b, A, B, dy, seed = _make(45, 64, 40, 20, torch.float32, False, True)
    thr = reference.dropout_threshold(0.2)
    dS = torch.randn(45, 20)
    want = K.lora_gemm(dy, W.t(), None, dS, A, seed=seed, threshold=thr, inv_keep=1.25, mask_lora=True,
                       impl="pointer")
    for cfg in tma_configs(interpret=False):
        got = K.lora_gemm(dy, W.t(), None, dS, A, seed=seed, threshold=thr, inv_keep=1.25, mask_lora=True,
                          impl="tma", config=cfg)
        assert_rel(got, want, 1e-5, str(cfg))


@pytest.mark.gpu
def test_gpu_every_tma_config_vs_pointer_kernel():
    """Each Hopper TMA config, compiled and forced alone (warp specialization, epilogue splits), against
    the pointer kernel: the forward fold (y) and the dgrad with the masked rank-r epilogue (dx), bf16."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernel needs sm90+")
    from fastpeft.kernels.lora_gemm_tma import tma_configs

    g = torch.Generator(device=DEVICE).manual_seed(5)
    M, fin, fout, r = 1000, 768, 1152, 16
    x = torch.randn(M, fin, device=DEVICE, generator=g).to(torch.bfloat16)
    W = (torch.randn(fout, fin, device=DEVICE, generator=g) / fin**0.5).to(torch.bfloat16)
    b = torch.randn(fout, device=DEVICE, generator=g).to(torch.bfloat16)
    xa = torch.randn(M, r, device=DEVICE, generator=g)
    Bs = torch.randn(r, fout, device=DEVICE, generator=g) / r**0.5
    dy = torch.randn(M, fout, device=DEVICE, generator=g).to(torch.bfloat16)
    dS = torch.randn(M, r, device=DEVICE, generator=g)
    A = torch.randn(r, fin, device=DEVICE, generator=g) / fin**0.5
    seed = torch.tensor([3], dtype=torch.int64, device=DEVICE)
    thr = reference.dropout_threshold(0.1)
    want_y = K.lora_gemm(x, W, b, xa, Bs, lora_scale=2.0, impl="pointer")
    want_dx = K.lora_gemm(dy, W.t(), None, dS, A, seed=seed, threshold=thr, inv_keep=1 / 0.9, mask_lora=True,
                          impl="pointer")
    from triton.runtime.errors import OutOfResources

    ran, too_big = 0, []
    for cfg in tma_configs(interpret=False):
        before = K.LAUNCHES["lora_gemm_tma"]
        try:
            got_y = K.lora_gemm(x, W, b, xa, Bs, lora_scale=2.0, impl="tma", config=cfg)
            got_dx = K.lora_gemm(dy, W.t(), None, dS, A, seed=seed, threshold=thr, inv_keep=1 / 0.9,
                                 mask_lora=True, impl="tma", config=cfg)
        except OutOfResources:  # the autotuner skips such a config; say which, below
            too_big.append(str(cfg))
            continue
        assert K.LAUNCHES["lora_gemm_tma"] == before + 2  # the TMA kernel ran, no fallback
        assert_rel(got_y.float(), want_y.float(), 1e-2, f"y {cfg}")
        assert_rel(got_dx.float(), want_dx.float(), 1e-2, f"dx {cfg}")
        ran += 1
    assert ran >= len(tma_configs(interpret=False)) - 1, f"configs over the device's limits: {too_big}"


def test_tma_falls_back_on_unaligned():
    x = torch.randn(5, 45)  # 45 fp32 = 180-byte rows: not 16-byte aligned
    W = torch.randn(24, 45)
    before = K.LAUNCHES["lora_gemm_tma"]
    K.lora_gemm(x, W, impl="tma")
    assert K.LAUNCHES["lora_gemm_tma"] == before
    with pytest.raises(ValueError, match="FASTPEFT_GEMM"):
        K.lora_gemm(x, W, impl="magic")


def test_tma_failure_falls_back_with_warning(monkeypatch):
    """Under auto, a TMA kernel that fails to build warns once and the pointer kernel takes over."""
    from fastpeft.kernels import lora_linear as LL

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(LL, "interpreting", lambda: False)  # let auto pick TMA in the interpreter
    monkeypatch.setattr(LL, "_lora_gemm_tma", broken)
    monkeypatch.setitem(LL._TMA_STATE, "disabled", None)
    # > 32 tokens of a half dtype: auto would take TMA (fp32 operands go to the pointer kernel)
    x, W = torch.randn(40, 64).half(), torch.randn(32, 64).half()
    l, r = torch.randn(40, 4), torch.randn(4, 32)
    with pytest.warns(RuntimeWarning, match="simulated compile failure"):
        y = K.lora_gemm(x, W, None, l, r)
    assert_rel(y, x.double() @ W.double().t() + l.double() @ r.double(), 2e-3, "fallback")
    assert LL._TMA_STATE["disabled"]
    before = K.LAUNCHES["lora_gemm"]
    K.lora_gemm(x, W, None, l, r)  # no second attempt
    assert K.LAUNCHES["lora_gemm"] == before + 1
    monkeypatch.setenv("FASTPEFT_GEMM", "tma")
    monkeypatch.setitem(LL._TMA_STATE, "disabled", None)
    with pytest.raises(RuntimeError, match="simulated"):
        K.lora_gemm(x, W, None, l, r)


def test_auto_keeps_fp32_and_mixed_dtypes_off_tma(monkeypatch):
    """auto sends fp32 operands (TMA configs sized for 2-byte elements) and an output dtype other than
    x's (not in the TMA autotune key) to the pointer kernel; half operands of > 32 rows go to TMA."""
    from fastpeft.kernels import lora_linear as LL

    monkeypatch.setattr(LL, "interpreting", lambda: False)
    monkeypatch.setattr(LL, "tma_supported", lambda *a: True)
    monkeypatch.setitem(LL._TMA_STATE, "disabled", None)
    h, w = torch.empty(64, 32, dtype=torch.float16), torch.empty(16, 32, dtype=torch.float16)
    assert LL.gemm_impl(h, w, torch.empty(64, 16, dtype=torch.float16)) == "tma"
    assert LL.gemm_impl(h, w, torch.empty(64, 16, dtype=torch.float32)) == "pointer"
    assert LL.gemm_impl(h.float(), w.float(), torch.empty(64, 16)) == "pointer"
    assert LL.gemm_impl(h.float(), w.float(), torch.empty(64, 16), impl="tma") == "tma"  # asked for: honoured


def test_tma_fold_keeps_fp16_in_range(monkeypatch):
    """fp16 activations with a large xa (> 65504): the TMA kernel's rank-r fold must not cast it
    to fp16 (bf16 is safe: fp32's range)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(40, 64, generator=g) * 3000).half()
    W = (torch.randn(32, 64, generator=g) / 8e3).half()
    A = torch.randn(4, 64, generator=g)
    B = torch.randn(32, 4, generator=g) * 1e-3
    xa = K.lora_down(x, A)
    assert xa.abs().max() > 65504
    for impl in ("tma", "pointer"):
        y = K.lora_gemm(x, W, None, xa, B.t(), lora_scale=1.0, impl=impl)
        assert torch.isfinite(y).all(), impl
        assert_rel(y, x.double() @ W.double().t() + xa.double() @ B.double().t(), 2e-3, impl)


def test_untuned_launch_prunes_then_skips_configs_that_do_not_fit(monkeypatch):
    """FASTPEFT_AUTOTUNE=0: the autotuner's prune, then the first config that launches."""
    from triton.runtime.errors import OutOfResources

    from fastpeft.kernels import lora_linear as LL

    launched = []

    class Raw:
        arg_names = ["x_ptr", "M_KEY"]

        def __getitem__(self, grid):
            def run(*args, **kw):
                if kw["BLOCK_M"] == 128:
                    raise OutOfResources(300_000, 232_448, "shared memory")
                launched.append(kw["BLOCK_M"])
            return run

    class Tuned:
        configs = [triton.Config({"BLOCK_M": m}) for m in (16, 128, 64, 32)]
        @staticmethod
        def early_config_prune(cfgs, named, **kw):  # thin tiles for few rows, as keep_for_rows
            return [c for c in cfgs if (c.kwargs["BLOCK_M"] <= 32) == (named["M_KEY"] <= 32)]

        def __getitem__(self, grid):
            raise AssertionError("the autotuner must not run")

    monkeypatch.setenv("FASTPEFT_AUTOTUNE", "0")
    LL._launch(Tuned(), Raw(), (1,), (None,), {"M_KEY": 4096}, None)  # 128 pruned in, does not fit: 64
    LL._launch(Tuned(), Raw(), (1,), (None,), {"M_KEY": 8}, None)  # small rows: 16 first
    assert launched == [64, 16]

    class AllTooBig(Tuned):
        configs = [triton.Config({"BLOCK_M": 128})]
        early_config_prune = None

    with pytest.raises(OutOfResources):
        LL._launch(AllTooBig(), Raw(), (1,), (None,), {"M_KEY": 4096}, None)


def test_warm_launch_compiles_every_pruned_config_then_launches_the_first_that_fits(monkeypatch):
    """FASTPEFT_AUTOTUNE=warm (fastpeft bench --compile-only): each config the autotuner would time is compiled
    with its pre-hook run first (the TMA configs set descriptor block shapes there) and never launched; one that
    fails to compile is skipped; then the launch is FASTPEFT_AUTOTUNE=0's."""
    from triton.runtime.errors import OutOfResources, PTXASError

    from fastpeft.kernels import lora_linear as LL

    events = []

    class Raw:
        arg_names = ["x_ptr", "M_KEY"]

        def warmup(self, *args, grid, **kw):
            events.append(("compile", kw["BLOCK_M"], kw["num_warps"], hooked.get(kw["BLOCK_M"])))
            if kw["BLOCK_M"] == 32:
                raise PTXASError("ptxas failed")

        def __getitem__(self, grid):
            def run(*args, **kw):
                if kw["BLOCK_M"] == 128:
                    raise OutOfResources(300_000, 232_448, "shared memory")
                events.append(("launch", kw["BLOCK_M"]))
            return run

    hooked = {}

    def hook(nargs):
        hooked[nargs["BLOCK_M"]] = nargs["M_KEY"]

    class Tuned:
        configs = [triton.Config({"BLOCK_M": m}, num_warps=w, pre_hook=hook) for m, w in
                   ((16, 4), (128, 8), (32, 4), (64, 4))]

        @staticmethod
        def early_config_prune(cfgs, named, **kw):
            return [c for c in cfgs if (c.kwargs["BLOCK_M"] <= 16) == (named["M_KEY"] <= 16)]

        def __getitem__(self, grid):
            raise AssertionError("the autotuner must not time anything")

    monkeypatch.setattr(LL, "interpreting", lambda: False)
    monkeypatch.setenv("FASTPEFT_AUTOTUNE", "warm")
    LL._launch(Tuned(), Raw(), (1,), (None,), {"M_KEY": 4096}, None)
    assert events == [("compile", 128, 8, 4096), ("compile", 32, 4, 4096), ("compile", 64, 4, 4096),
                      ("launch", 32)]  # the compile error did not stop the pass; 128 does not fit: 32 launches
    events.clear()
    monkeypatch.setenv("FASTPEFT_AUTOTUNE", "0")
    LL._launch(Tuned(), Raw(), (1,), (None,), {"M_KEY": 4096}, None)
    assert events == [("launch", 32)]  # no compile-only pass outside warm mode


@pytest.mark.gpu
def test_warm_process_leaves_a_tuned_process_nothing_to_compile_on_the_gpu(tmp_path):
    """On the device, as bench/gpu_run.sh uses it: a FASTPEFT_AUTOTUNE=warm process (correct results) fills the
    on-disk cache, and a later autotuning process of the same layer compiles nothing new."""
    import os
    import subprocess
    import sys

    code = """
import torch, fastpeft, triton
torch.manual_seed(0)
layer = fastpeft.FastLoraLinear(1024, 768, r=16, lora_alpha=32, lora_dropout=0.1, init_lora_weights=False,
                                device="cuda", dtype=torch.bfloat16).train()
x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
layer(x).float().pow(2).sum().backward()
torch.cuda.synchronize()
assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)

    def entries():
        return sum(f.startswith("__grp__") for _, _, files in os.walk(tmp_path) for f in files)

    counts = []
    for mode in ("warm", "1"):
        proc = subprocess.run([sys.executable, "-c", code], env={**env, "FASTPEFT_AUTOTUNE": mode},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts.append(entries())
    assert counts[0] > 4 and counts[1] == counts[0], counts


def test_autotune_mode_reads_fastpeft_autotune(monkeypatch):
    from fastpeft.kernels import configs as C

    for value, mode in (("1", "tune"), ("", "tune"), ("0", "first"), ("warm", "warm"), (" WARM ", "warm")):
        monkeypatch.setenv("FASTPEFT_AUTOTUNE", value)
        assert C.autotune_mode() == mode and C.autotuning() == (mode == "tune")
    monkeypatch.delenv("FASTPEFT_AUTOTUNE")
    assert C.autotune_mode() == "tune"
    monkeypatch.setenv("FASTPEFT_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="FASTPEFT_AUTOTUNE"):
        C.autotune_mode()


def test_fp32_results_use_fp32_accurate_dots(monkeypatch):
    """xa, dS, dA, dB are fp32 results: from half activations their dots run 3×TF32 (one TF32 pass would
    leave ~2⁻¹¹ operand error, far above peft's fp32 LoRA branch); folds into a half output keep TF32."""
    from fastpeft.kernels import lora_linear as LL
    from fastpeft.kernels import lora_mixed as MX

    assert LL._f32_exact_precision(torch.bfloat16) == LL._f32_exact_precision(torch.float16) == "tf32x3"
    assert LL._f32_exact_precision(torch.float32) == "ieee" and LL._f32_precision(torch.bfloat16) == "tf32"
    before = torch.backends.cuda.matmul.allow_tf32  # (monkeypatch cannot restore this module's attribute)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert LL._f32_exact_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    seen = {}

    def spy(tuned, raw, grid, args, kwargs, config):
        seen[raw.fn.__name__ if hasattr(raw, "fn") else raw.__name__] = kwargs["F32_PRECISION"]

    monkeypatch.setattr(LL, "_launch", spy)
    monkeypatch.setattr(MX, "_launch", spy)
    x = torch.randn(40, 64).to(torch.bfloat16)
    A, g = torch.randn(8, 64), torch.randn(40, 8)
    LL.lora_down(x, A)
    LL.lora_reduce(g, x)
    idx = torch.zeros(40, dtype=torch.int32)
    perm, seg = torch.arange(40), torch.tensor([0, 40])
    MX.mixed_down(x, A[None], idx, perm, torch.ones(1))
    MX.mixed_reduce(g, x, perm, seg, torch.ones(1), 1)
    MX.mixed_up_(x.clone(), g, A[None], idx, perm, torch.ones(1))
    assert seen == {"_lora_down_kernel": "tf32x3", "_lora_reduce_kernel": "tf32x3", "_mixed_down_kernel": "tf32x3",
                    "_mixed_reduce_kernel": "tf32x3", "_mixed_up_kernel": "tf32"}
