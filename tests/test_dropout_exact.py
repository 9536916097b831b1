"""Dropout's exact semantics: ``p = 1`` (everything dropped, as peft's ``nn.Dropout(p=1)``) and an unbiased keep
scale for every ``p``, on the PyTorch backend and the Triton kernels (interpreted on CPU).

The keep decision compares 16 random bits with ``t = dropout_threshold(p)``, so an element is kept with probability
exactly ``(65536 − t) / 65536``; kept values must be scaled by the inverse of that, ``65536 / (65536 − t)``, not by
``1 / (1 − p)`` (biased by the quantization of p: ×1.07 at p = 0.9999, ×1.53 at p = 0.99999, and a scaling without
any drop for p < 2⁻¹⁷).
"""

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import FastLoraLinear, reference
from fastpeft.ops import _lora_linear_op, lora_linear, philox_dropout
from fastpeft.ops_mixed import lora_linear_mixed
from helpers import Wrap, assert_rel, tiny_llama

peft = pytest.importorskip("peft")

PS = [0.1, 0.999, 0.99999, 1e-6]


def _spec(p):
    """The documented rule, written out independently of the code: threshold ``round(p · 2¹⁶)`` (65535 at most
    below p = 1, 65536 at p = 1) and keep scale ``2¹⁶ / (2¹⁶ − t)`` (0 when nothing is kept)."""
    t = 65536 if p == 1.0 else min(round(p * 65536), 65535)
    return t, (0.0 if t == 65536 else 65536 / (65536 - t))


def _launched() -> int:
    import fastpeft.kernels as K

    return sum(K.LAUNCHES.values())


# ----------------------------------------------------------------------------- the rule
def test_threshold_rule_and_keep_scale():
    one = reference.DROPOUT_ONE
    assert one == 65536
    assert reference.dropout_params(0.0) == (0, 1.0)
    assert reference.dropout_params(1e-6) == (0, 1.0)  # p < 2⁻¹⁷ rounds to nothing dropped: the identity
    assert reference.dropout_params(1.0) == (one, 0.0)  # only p = 1 drops everything; no 1/(1-p) formed
    assert reference.dropout_params(1 - 1e-9)[0] == one - 1  # just below 1: one element in 65536 kept
    assert reference.dropout_params(0.5) == (32768, 2.0)
    for p in PS + [0.3, 0.9999, 1 - 1e-9, 1.0]:
        t, c = reference.dropout_params(p)
        assert (t, c) == _spec(p)
        if p == 1.0:
            continue
        assert math.isfinite(c)
        assert abs(c * (one - t) / one - 1.0) < 1e-15  # E[D(x)] = x exactly (keep probability × keep scale)
    assert not reference.drops(1e-6) and reference.drops(0.1) and reference.drops(1.0)
    for bad in (-0.1, 1.0000001, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            reference.dropout_params(bad)


# ----------------------------------------------------------------------------- the keep scale through the op
@pytest.mark.parametrize("p", PS)
def test_kept_values_are_scaled_by_the_exact_keep_probability(backend, p):
    """With A = I the op's ``xa`` is D(x) itself: dropped entries are 0 (the reference's mask), kept ones equal
    ``x · 65536/(65536 − t)`` exactly; with x = 1 the kept value times the keep rate is 1."""
    M, K = 4096, 16  # 2¹⁶ elements: at p = 0.99999 (one in 65536 kept) this seed keeps a few
    g = torch.Generator().manual_seed(5)
    x = torch.randn(M, K, generator=g)
    W, A, B = torch.zeros(8, K), torch.eye(K), torch.randn(8, K, generator=g)
    seed = torch.tensor([11], dtype=torch.int64)
    t, c = _spec(p)
    before = _launched()
    _, xa = _lora_linear_op(x, W, None, A, B, seed, 1.0, p, False)
    if backend == "triton":
        assert _launched() > before  # the kernels ran
    keep = reference.dropout_keep_mask(seed, M, K, p)
    assert keep.any() and not keep.all() if t > 0 else keep.all()
    want = torch.where(keep, x * torch.tensor(c, dtype=torch.float32), torch.zeros(()))
    assert torch.equal(xa, want)
    if t == 0:
        assert torch.equal(xa, x)  # nothing dropped, nothing scaled
    ones = _lora_linear_op(torch.ones(M, K), W, None, A, B, seed, 1.0, p, False)[1]
    kept_values = torch.unique(ones[ones != 0])
    assert kept_values.numel() == 1 and kept_values.item() == torch.tensor(c, dtype=torch.float32).item()
    assert abs(kept_values.double().item() * (65536 - t) / 65536 - 1.0) < 1e-7  # unbiased (fp32 rounding of c)


@pytest.mark.parametrize("p", PS)
def test_dropout_function_is_unbiased(p):
    """``philox_dropout`` (DoRA's D(x), the same mask): kept values ``65536/(65536 − t)``, keep rate
    ``(65536 − t)/65536`` within 5σ over 2¹⁸ elements, and the gradient is the same masked scaling."""
    x = torch.ones(512, 512, requires_grad=True)
    seed = torch.tensor([11], dtype=torch.int64)
    t, c = _spec(p)
    d = philox_dropout(x, p, seed)
    kept = d != 0
    assert torch.equal(torch.unique(d[kept]), torch.tensor([c], dtype=torch.float32))
    q, n = (65536 - t) / 65536, x.numel()
    assert abs(kept.double().mean().item() - q) <= 5 * math.sqrt(q * (1 - q) / n) + 1e-12
    d.backward(torch.full_like(d, 3.0))
    assert torch.equal(x.grad, torch.where(kept, torch.tensor(3.0 * c, dtype=torch.float32), torch.zeros(())))


@pytest.mark.parametrize("p", PS)
def test_gradients_equal_a_reference_with_the_same_mask(backend, p):
    N, fin, fout, r = 4096, 24, 20, 4  # ~10⁵ elements: at p = 0.99999 the seed below keeps three
    g = torch.Generator().manual_seed(9)
    x = torch.randn(N, fin, generator=g, requires_grad=True)
    W, b = torch.randn(fout, fin, generator=g) * 0.2, torch.randn(fout, generator=g, requires_grad=True)
    A = (torch.randn(r, fin, generator=g) * 0.3).requires_grad_()
    B = (torch.randn(fout, r, generator=g) * 0.3).requires_grad_()
    seed = torch.tensor([8], dtype=torch.int64)
    y = lora_linear(x, W, b, A, B, scale=1.5, dropout_p=p, seed=seed)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    t, c = _spec(p)
    keep = reference.dropout_keep_mask(seed, N, fin, p).double()
    assert 0 < keep.sum() < keep.numel() if t > 0 else keep.sum() == keep.numel()
    x64, A64, B64, b64 = (v.detach().double().requires_grad_() for v in (x, A, B, b))
    y64 = x64 @ W.double().t() + b64 + 1.5 * ((x64 * keep * c) @ A64.t()) @ B64.t()
    y64.backward(dy.double())
    # fp32 on these small shapes is within ~1e-7 of fp64; 2e-6 still tells the exact keep scale from 1/(1 − p)
    # (off by 6.8e-6 at p = 0.1, 7e-3 at p = 0.999)
    assert_rel(y, y64, 2e-6, "y")
    grads = {"dx": x.grad, "dA": A.grad, "dB": B.grad, "db": b.grad}
    for name, ref in (("dx", x64.grad), ("dA", A64.grad), ("dB", B64.grad), ("db", b64.grad)):
        assert_rel(grads[name], ref, 2e-6, name)
    if t == 0:  # p rounds to no drop at all: exactly the p = 0 op (no mask, no scaling)
        x0, A0, B0, b0 = (v.detach().clone().requires_grad_() for v in (x, A, B, b))
        y0 = lora_linear(x0, W, b0, A0, B0, scale=1.5, dropout_p=0.0)
        y0.backward(dy)
        assert torch.equal(y, y0)
        for name, v in (("dx", x0), ("dA", A0), ("dB", B0), ("db", b0)):
            assert torch.equal(grads[name], v.grad), name


# ----------------------------------------------------------------------------- p = 1 against peft
def _peft_layer(base, p, use_dora=False):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["proj"], init_lora_weights=False,
                          use_dora=use_dora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(Wrap(base), cfg).base_model.model.proj


def _pair(p=1.0, use_dora=False, fin=24, fout=20):
    torch.manual_seed(fin + fout)
    base = nn.Linear(fin, fout)
    ref = _peft_layer(copy.deepcopy(base), p, use_dora)
    ours = FastLoraLinear.from_linear(copy.deepcopy(base), r=4, lora_alpha=8, lora_dropout=p,
                                      init_lora_weights=False, use_dora=use_dora)
    ours.load_state_dict(ref.state_dict())
    return base, ref, ours


def _run(layer, x, dy):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    grads = {k: p.grad for k, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_p1_layer_equals_base_in_training_and_peft(backend, use_dora):
    base, ref, ours = _pair(1.0, use_dora)
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(3, 5, 24, generator=g), torch.randn(3, 5, 20, generator=g)
    ref.train(), ours.train()
    y_ref, dx_ref, g_ref = _run(ref, x, dy)
    before = _launched()
    y, dx, grads = _run(ours, x, dy)
    if backend == "triton":
        assert _launched() > before
    with torch.no_grad():
        y_base = base(x)
    assert torch.equal(y_ref, y_base)  # peft: nn.Dropout(p=1) zeroes the branch
    if backend == "torch":
        assert torch.equal(y, y_base)
    assert_rel(y, y_base, 1e-6, "train output vs base")
    assert_rel(dx, dy @ base.weight.detach(), 1e-5, "dx = dy W0")
    assert_rel(dx, dx_ref, 1e-5, "dx vs peft")
    assert set(grads) == set(g_ref)
    for k, gr in grads.items():
        assert torch.isfinite(gr).all(), k
        assert torch.count_nonzero(gr) == 0 and torch.count_nonzero(g_ref[k]) == 0, k  # A, B (m) get zeros
    # eval: no dropout, ordinary LoRA (DoRA) equal to peft's
    ref.eval(), ours.eval()
    with torch.no_grad():
        y_eval, y_eval_ref = ours(x), ref(x)
    assert_rel(y_eval, y_eval_ref, 1e-5, "eval vs peft")
    assert (y_eval - y_base).abs().max() > 1e-3  # the adapter acts in eval


def test_p1_4bit_layer_equals_base_in_training(backend):
    from fastpeft.layers.lora4bit import FastLoraLinear4bit

    torch.manual_seed(3)
    layer = FastLoraLinear4bit.from_linear(nn.Linear(64, 24), r=4, lora_alpha=8, lora_dropout=1.0,
                                           init_lora_weights=False)
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 24, generator=g)
    layer.train()
    y, dx, grads = _run(layer, x, dy)
    xb = x.detach().clone().requires_grad_()
    with layer.disable_adapter():
        yb = layer(xb)
    yb.backward(dy)
    assert_rel(y, yb, 1e-6, "4-bit train output vs base")
    assert_rel(dx, xb.grad, 1e-5, "4-bit dx vs base")
    for k, gr in grads.items():
        assert torch.isfinite(gr).all() and torch.count_nonzero(gr) == 0, k
    layer.eval()
    with torch.no_grad():
        assert (layer(x) - yb.detach()).abs().max() > 1e-3


def test_p1_mixed_adapter_batch(backend):
    """Rows of the p = 1 adapter are the base's and its gradients zero; the other adapter's rows keep their own
    dropout (p = 0.3, exact keep scale), all in one op."""
    IN, OUT = 45, 37
    g = torch.Generator().manual_seed(3)
    seq_idx, ranks, ps, scales = [0, 1, -1, 1, 0], (4, 8), [0.3, 1.0], [1.0, 2.0]
    x = torch.randn(len(seq_idx), 3, IN, generator=g).requires_grad_()
    W, b = torch.randn(OUT, IN, generator=g) * 0.2, torch.randn(OUT, generator=g)
    As = [(torch.randn(r, IN, generator=g) * 0.3).requires_grad_() for r in ranks]
    Bs = [(torch.randn(OUT, r, generator=g) * 0.3).requires_grad_() for r in ranks]
    seed = torch.tensor([1234], dtype=torch.int64)
    y = lora_linear_mixed(x, W, b, As, Bs, torch.tensor(seq_idx), scales=scales, dropout_ps=ps, seed=seed)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    # fp64 reference, row by row, the core's (seed, row, col) masks with the exact keep scale
    index = torch.tensor(seq_idx).repeat_interleave(3)
    x64 = x.detach().reshape(-1, IN).double().requires_grad_()
    A64 = [A.detach().double().requires_grad_() for A in As]
    B64 = [B.detach().double().requires_grad_() for B in Bs]
    rows = []
    for m in range(x64.shape[0]):
        a, row = int(index[m]), x64[m] @ W.double().t() + b.double()
        if a >= 0:
            _, c = _spec(ps[a])
            keep = reference.dropout_keep_rows(seed, torch.tensor([m]), IN, ps[a])[0].double()
            row = row + scales[a] * ((x64[m] * keep * c) @ A64[a].t()) @ B64[a].t()
        rows.append(row)
    y64 = torch.stack(rows)
    (y64 * dy.reshape(-1, OUT).double()).sum().backward()
    y2d = y.detach().reshape(-1, OUT)
    assert_rel(y2d, y64, 1e-5, "y")
    base_rows = (x.detach().reshape(-1, IN) @ W.t() + b)[index == 1]
    assert_rel(y2d[index == 1], base_rows, 1e-6, "p = 1 rows equal the base")
    assert_rel(x.grad.reshape(-1, IN), x64.grad, 1e-5, "dx")
    assert_rel(As[0].grad, A64[0].grad, 1e-5, "dA[0]")
    assert_rel(Bs[0].grad, B64[0].grad, 1e-5, "dB[0]")
    assert torch.count_nonzero(As[1].grad) == 0 and torch.count_nonzero(Bs[1].grad) == 0
    assert torch.isfinite(As[1].grad).all() and torch.isfinite(Bs[1].grad).all()
    y_eval = lora_linear_mixed(x, W, b, As, Bs, torch.tensor(seq_idx), scales=scales, dropout_ps=ps, training=False)
    assert (y_eval.reshape(-1, OUT)[index == 1] - base_rows).abs().max() > 1e-3


def test_p1_tiny_llama_equals_peft_and_round_trips(backend, tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    cfg = dict(r=4, lora_alpha=8, lora_dropout=1.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    ours.load_state_dict(theirs.state_dict())
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    losses = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        model.train()
        out = model(input_ids=ids, labels=ids)
        assert_rel(out.logits, base_logits, 1e-5, f"{name}: train logits vs base")
        out.loss.backward()
        losses[name] = out.loss.detach()
        lora = {k: p.grad for k, p in model.named_parameters() if "lora_" in k}
        assert len(lora) == 8 and all(gr is not None and torch.count_nonzero(gr) == 0 for gr in lora.values())
    assert_rel(losses["ours"], losses["theirs"], 1e-5, "loss")
    ours.eval(), theirs.eval()
    with torch.no_grad():
        ev = ours(input_ids=ids).logits
        assert_rel(ev, theirs(input_ids=ids).logits, 1e-5, "eval logits vs peft")
        assert (ev - base_logits).abs().max() > 1e-4
    ours.save_pretrained(tmp_path / "fp")
    assert json.loads((tmp_path / "fp" / "adapter_config.json").read_text())["lora_dropout"] == 1.0
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fp")
    assert loaded.peft_config["default"].lora_dropout == 1.0
    with torch.no_grad():
        assert_rel(loaded(input_ids=ids).logits, ev, 1e-5, "peft loads fastpeft's p = 1 adapter")
    theirs.save_pretrained(tmp_path / "pf")
    mine = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "pf", is_trainable=True)
    assert mine.peft_config["default"].lora_dropout == 1.0
    mine.train()
    with torch.no_grad():
        assert_rel(mine(input_ids=ids).logits, base_logits, 1e-5, "fastpeft loads peft's: train = base")


def test_p1_accepted_where_lora_dropout_is():
    assert fastpeft.LoraConfig(lora_dropout=1.0).lora_dropout == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fastpeft.LoraConfig(lora_dropout=1.5)
    from fastpeft.methods.configs import AdaLoraConfig

    assert AdaLoraConfig(lora_dropout=1.0, total_step=100).lora_dropout == 1.0
    from fastpeft.layers.conv import FastLoraConv
    from fastpeft.layers.embedding import FastLoraEmbedding

    conv = FastLoraConv(nn.Conv2d(3, 4, 3), r=2, lora_dropout=1.0, init_lora_weights=False).train()
    xc = torch.randn(2, 3, 6, 6)
    assert torch.equal(conv(xc), conv.base_layer(xc))  # nn.Dropout(1) zeroes the branch, as peft
    FastLoraEmbedding(10, 4, r=2, lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FastLoraLinear(8, 8, lora_dropout=1.5)
    x = torch.randn(4, 8)
    assert torch.equal(philox_dropout(x, 1.0, torch.tensor([3])), torch.zeros_like(x))
    from fastpeft.cli import main

    with pytest.raises(SystemExit, match=r"--dropout must be in \[0, 1\]"):
        main(["bench", "--dropout", "1.5"])
