"""Mixed-adapter batches (issue 9): one adapter per sequence, in one fused op, eval and training.

Op level (both backends; ``triton`` = the kernels of ``kernels/lora_mixed.py`` in the interpreter):
outputs against an independent fp64 per-row reference, gradients against per-adapter sub-batch
references computed separately, dropout against the core op's mask. Model level: outputs equal
peft's ``adapter_names`` outputs with the same weights (forward and generate), training gradients
equal the per-adapter sub-batch gradients, bad names raise listing the adapters, several adapters
round-trip with peft's folder layout.
"""

from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft.kernels import LAUNCHES
from fastpeft.layers.lora import FastLoraLinear
from fastpeft.ops import lora_linear
from fastpeft.ops_mixed import _lora_mixed_op, lora_linear_mixed, sort_rows, stack_adapters
from fastpeft.reference import dropout_keep_rows
from helpers import assert_rel, assert_rule, keep_scale64, lora_grads64

IN, OUT = 45, 37  # odd: not multiples of any block

# (adapter index per sequence, ranks): random mix, one adapter only, all base, a single-row adapter
MIXES = {
    "mix": ([1, -1, 0, 2, 1, 0, 2], (3, 8, 1)),
    "one_adapter": ([0, 0, 0], (5,)),
    "all_base": ([-1, -1], (4, 2)),
    "single_row": ([0, 0, 1, 0, -1], (2, 16)),
}


def _adapters(ranks, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    As = [(torch.randn(r, IN, generator=g) * 0.3).to(dtype).requires_grad_() for r in ranks]
    Bs = [(torch.randn(OUT, r, generator=g) * 0.3).to(dtype).requires_grad_() for r in ranks]
    return As, Bs


def _ref64(x2d, W, b, As, Bs, index, scales, ps, seed):
    """fp64 forward, row by row of each adapter; dropout replayed from the core's (seed, row, col) keys."""
    y = x2d.double() @ W.double().t() + b.double()
    out = []
    for m in range(x2d.shape[0]):
        a = int(index[m])
        row = y[m]
        if a >= 0:
            xm = x2d[m].double()
            if ps[a] > 0:
                keep = dropout_keep_rows(seed, torch.tensor([m]), IN, ps[a])[0].double()
                xm = xm * keep * keep_scale64(ps[a])
            row = row + scales[a] * (xm @ As[a].double().t()) @ Bs[a].double().t()
        out.append(row)
    return torch.stack(out)


@pytest.mark.parametrize("mix", list(MIXES))
def test_forward_and_grads_match_per_adapter_references(backend, mix):
    seq_idx, ranks = MIXES[mix]
    T = 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(seq_idx), T, IN, generator=g).requires_grad_()
    W, b = torch.randn(OUT, IN, generator=g) * 0.2, torch.randn(OUT, generator=g).requires_grad_()
    As, Bs = _adapters(ranks)
    scales = [2.0, 0.5, 1.25][: len(ranks)]
    before = sum(v for k, v in LAUNCHES.items() if k.startswith("mixed_"))
    y = lora_linear_mixed(x, W, b, As, Bs, torch.tensor(seq_idx), scales=scales)
    index = torch.tensor(seq_idx).repeat_interleave(T)
    x2d = x.detach().reshape(-1, IN)
    ref = _ref64(x2d, W, b.detach(), As, Bs, index, scales, [0.0] * len(ranks), None)
    assert_rel(y.reshape(-1, OUT), ref, 1e-5, "y")
    if mix != "all_base":
        assert (ref - (x2d.double() @ W.double().t() + b.double())).abs().max() > 1e-2  # adapters change y
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    dy2d = dy.reshape(-1, OUT)
    # dx of base rows and bias: the base alone; each adapter's grads: its own sub-batch, separately
    dx_ref = dy2d.double() @ W.double()
    for a in range(len(ranks)):
        rows = (index == a).nonzero().flatten()
        if rows.numel() == 0:
            assert As[a].grad is None or not As[a].grad.any()
            continue
        dxa, dA, dB, _ = lora_grads64(dy2d[rows], x2d[rows], W, As[a], Bs[a], scales[a])
        dx_ref[rows] = dxa
        assert_rel(As[a].grad, dA, 1e-5, f"dA[{a}]")
        assert_rel(Bs[a].grad, dB, 1e-5, f"dB[{a}]")
    assert_rel(x.grad.reshape(-1, IN), dx_ref, 1e-5, "dx")
    assert_rel(b.grad, dy2d.double().sum(0), 1e-5, "db")
    if backend == "triton" and mix != "all_base":
        assert sum(v for k, v in LAUNCHES.items() if k.startswith("mixed_")) > before  # the kernels ran


def test_dropout_per_adapter_and_repeatable(backend):
    g = torch.Generator().manual_seed(3)
    seq_idx, ranks, ps, scales = [0, 1, 2, 1, -1, 0], (4, 8, 2), [0.1, 0.0, 0.5], [1.0, 2.0, 0.5]
    x = torch.randn(len(seq_idx), 5, IN, generator=g).requires_grad_()
    W, b = torch.randn(OUT, IN, generator=g) * 0.2, torch.zeros(OUT)
    As, Bs = _adapters(ranks)
    seed = torch.tensor([1234], dtype=torch.int64)
    y = lora_linear_mixed(x, W, b, As, Bs, torch.tensor(seq_idx), scales=scales, dropout_ps=ps, seed=seed)
    index = torch.tensor(seq_idx).repeat_interleave(5)
    x2d = x.detach().reshape(-1, IN)
    assert_rel(y.reshape(-1, OUT), _ref64(x2d, W, b, As, Bs, index, scales, ps, seed), 1e-5, "y with dropout")
    # gradients by fp64 autograd through the same per-row masks
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    x64 = x2d.double().requires_grad_()
    A64 = [A.detach().double().requires_grad_() for A in As]
    B64 = [B.detach().double().requires_grad_() for B in Bs]
    (_ref64(x64, W, b, A64, B64, index, scales, ps, seed) * dy.reshape(-1, OUT).double()).sum().backward()
    assert_rel(x.grad.reshape(-1, IN), x64.grad, 1e-5, "dx")
    for a in range(3):
        assert_rel(As[a].grad, A64[a].grad, 1e-5, f"dA[{a}]")
        assert_rel(Bs[a].grad, B64[a].grad, 1e-5, f"dB[{a}]")
    # same seed → same output; eval → no dropout
    y2 = lora_linear_mixed(x, W, b, As, Bs, torch.tensor(seq_idx), scales=scales, dropout_ps=ps, seed=seed)
    assert torch.equal(y, y2)
    y_eval = lora_linear_mixed(x, W, b, As, Bs, torch.tensor(seq_idx), scales=scales, dropout_ps=ps, training=False)
    assert_rel(y_eval.reshape(-1, OUT), _ref64(x2d, W, b, As, Bs, index, scales, [0.0] * 3, None), 1e-5, "eval")


def test_one_adapter_batch_drops_what_the_core_op_drops(backend):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, IN, generator=g)
    W, b = torch.randn(OUT, IN, generator=g) * 0.2, torch.randn(OUT, generator=g)
    (A,), (B,) = _adapters((8,))
    seed = torch.tensor([77], dtype=torch.int64)
    ours = lora_linear_mixed(x, W, b, [A], [B], torch.zeros(4, dtype=torch.int64), scales=[1.5], dropout_ps=[0.3],
                             seed=seed)
    core = lora_linear(x, W, b, A, B, scale=1.5, dropout_p=0.3, seed=seed)
    assert_rel(ours, core, 1e-5, "mixed (one adapter) vs core")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_follows_the_tolerance_rule(backend, dtype):
    g = torch.Generator().manual_seed(5)
    seq_idx, ranks, scales = [2, 0, -1, 1, 0], (4, 16, 2), [2.0, 0.5, 1.0]
    x = torch.randn(len(seq_idx), 3, IN, generator=g).to(dtype)
    W, b = (torch.randn(OUT, IN, generator=g) * 0.2).to(dtype), torch.randn(OUT, generator=g).to(dtype)
    As, Bs = _adapters(ranks)  # fp32 adapters on a half base, as fastpeft keeps them
    y = lora_linear_mixed(x, W, b, As, Bs, torch.tensor(seq_idx), scales=scales)
    assert y.dtype == dtype
    index = torch.tensor(seq_idx).repeat_interleave(3)
    x2d = x.reshape(-1, IN)
    ref = _ref64(x2d, W, b, As, Bs, index, scales, [0.0] * 3, None)
    lowp = torch.nn.functional.linear(x2d, W, b)
    for m in range(x2d.shape[0]):
        a = int(index[m])
        if a >= 0:
            lowp[m] += (scales[a] * (x2d[m] @ As[a].detach().to(dtype).t()) @ Bs[a].detach().to(dtype).t())
    assert_rule(y.reshape(-1, OUT), ref, lowp, name=str(dtype))


def test_backward_is_deterministic_and_backends_agree(monkeypatch):
    g = torch.Generator().manual_seed(6)
    seq_idx, ranks = [1, 0, 1, 1, -1, 0, 2], (4, 8, 3)
    x = torch.randn(len(seq_idx), 4, IN, generator=g)
    W, b = torch.randn(OUT, IN, generator=g) * 0.2, torch.randn(OUT, generator=g)
    dy = torch.randn(len(seq_idx), 4, OUT, generator=g)
    seed = torch.tensor([9], dtype=torch.int64)
    results = {}
    for name in ("triton", "triton", "torch"):
        monkeypatch.setenv("FASTPEFT_BACKEND", name)
        As, Bs = _adapters(ranks)
        xx = x.clone().requires_grad_()
        y = lora_linear_mixed(xx, W, b, As, Bs, torch.tensor(seq_idx), scales=[1.0, 2.0, 0.5],
                              dropout_ps=[0.2, 0.0, 0.4], seed=seed)
        y.backward(dy)
        got = [y.detach(), xx.grad] + [t.grad for t in As + Bs]
        if name in results:
            assert all(torch.equal(p, q) for p, q in zip(got, results[name])), "repeat differs"
        results[name] = got
    for p, q in zip(results["triton"], results["torch"]):
        assert_rel(p, q, 1e-5, "triton vs torch")


def test_op_registration_checks():
    As, Bs = _adapters((3, 5))
    A_stack, B_stack = stack_adapters([A.detach() for A in As], [B.detach() for B in Bs])
    assert A_stack.shape == (2, 5, IN) and B_stack.shape == (2, OUT, 5)
    assert not A_stack[0, 3:].any() and not B_stack[0, :, 3:].any()
    idx_s, perm, seg = sort_rows(torch.tensor([1, -1, 0, 1]), 2)
    assert idx_s.tolist() == [-1, 0, 1, 1] and perm.tolist() == [1, 2, 0, 3] and seg.tolist() == [1, 2, 4]
    x = torch.randn(4, IN, requires_grad=True)
    W = torch.randn(OUT, IN)
    torch.library.opcheck(_lora_mixed_op, (x, W, None, A_stack.requires_grad_(), B_stack.requires_grad_(), idx_s,
                                           perm, seg, None, [1.0, 2.0], [0.0, 0.0], False))


def test_bad_arguments_raise_clearly():
    As, Bs = _adapters((3,))
    x, W = torch.randn(2, 3, IN), torch.randn(OUT, IN)
    with pytest.raises(ValueError, match=r"index values must be in \[-1, 1\)"):
        lora_linear_mixed(x, W, None, As, Bs, torch.tensor([0, 1]), scales=[1.0])
    with pytest.raises(ValueError, match="per sequence"):
        lora_linear_mixed(x, W, None, As, Bs, torch.tensor([0, 0, 0]), scales=[1.0])
    with pytest.raises(ValueError, match="one lora_A, lora_B and scale"):
        lora_linear_mixed(x, W, None, As, Bs, torch.tensor([0, 0]), scales=[1.0, 2.0])


# ----------------------------------------------------------------------------- layer and model vs peft
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

_CONFIGS = {  # different r, alpha, rsLoRA, targets
    "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "second": dict(r=2, lora_alpha=6, target_modules=["k_proj", "o_proj", "v_proj"], use_rslora=True),
    "third": dict(r=8, lora_alpha=4, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]),
}


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _fresh_base():
    base = _llama().eval()
    base.load_state_dict(_BASE_STATE)
    return base


def _models():
    torch.manual_seed(0)
    base_a = _llama().eval()
    base_b = _llama().eval()
    state = {k: v.clone() for k, v in base_a.state_dict().items()}
    base_b.load_state_dict(state)
    torch.manual_seed(1)
    ours = theirs = None
    for name, kw in _CONFIGS.items():
        if ours is None:
            ours = fastpeft.get_peft_model(base_a, fastpeft.LoraConfig(init_lora_weights=False, **kw))
            theirs = peft.get_peft_model(base_b, peft.LoraConfig(init_lora_weights=False, **kw))
        else:
            ours.add_adapter(name, fastpeft.LoraConfig(init_lora_weights=False, **kw))
            theirs.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **kw))
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    _BASE_STATE.clear()
    _BASE_STATE.update(state)
    return ours.eval(), theirs.eval()


_BASE_STATE: dict = {}
NAMES = ["second", "__base__", "default", "third", "second", "default"]


def _assert_rows_equal_each_adapter_alone(model, ids, names, logits):
    """Each sequence of a mixed batch equals the model run on it with its adapter alone (base: disabled)."""
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model(input_ids=ids[i:i + 1]).logits
        else:
            model.set_adapter(name)
            alone = model(input_ids=ids[i:i + 1]).logits
        assert_rel(logits[i:i + 1], alone, 1e-5, f"row {i} ({name})")


def test_model_mixed_batch_equals_peft_adapter_names():
    ours, theirs = _models()
    ids = torch.randint(1, 96, (len(NAMES), 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        la = ours(input_ids=ids, adapter_names=NAMES).logits
        lb = theirs(input_ids=ids, adapter_names=NAMES).logits
        assert_rel(la, lb, 1e-5, "mixed logits")
        _assert_rows_equal_each_adapter_alone(ours, ids, NAMES, la)
        ours.set_adapter("default")
        assert not torch.allclose(la[0], ours(input_ids=ids[:1]).logits[0], atol=1e-4)  # adapters differ


def test_generate_with_adapter_names_equals_peft():
    ours, theirs = _models()
    ids = torch.randint(1, 96, (3, 5), generator=torch.Generator().manual_seed(3))
    names = ["third", "__base__", "second"]
    for kw in (dict(do_sample=False), dict(do_sample=False, num_beams=2)):
        out_a = ours.generate(input_ids=ids, max_new_tokens=4, adapter_names=names, **kw)
        out_b = theirs.generate(input_ids=ids, max_new_tokens=4, adapter_names=names, **kw)
        assert torch.equal(out_a, out_b), kw


def test_training_grads_come_from_each_adapters_own_rows():
    ours, theirs = _models()
    ours.train(), theirs.train()
    ours.base_model.set_adapter(list(_CONFIGS))  # every adapter trainable
    names = ["second", "default", "__base__", "second", "third"]
    ids = torch.randint(1, 96, (len(names), 6), generator=torch.Generator().manual_seed(4))
    logits = ours(input_ids=ids, adapter_names=names).logits
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    (logits * g).sum().backward()
    ref = {}
    for name in _CONFIGS:  # peft, each adapter on its own sub-batch, separately
        rows = [i for i, n in enumerate(names) if n == name]
        theirs.set_adapter(name)
        theirs.zero_grad()
        (theirs(input_ids=ids[rows]).logits * g[rows]).sum().backward()
        ref.update({k: p.grad.clone() for k, p in theirs.named_parameters() if f".{name}." in k and p.grad is not None})
    ours_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(ref) and ref
    for k, grad in ours_grads.items():
        assert grad is not None, k
        assert_rel(grad, ref[k], 1e-4, k)


def test_bad_adapter_names_raise_clearly():
    ours, _ = _models()
    ids = torch.randint(1, 96, (2, 4))
    with pytest.raises(ValueError, match=r"non-existing adapter\(s\): typo.*'default', 'second', 'third'"):
        ours(input_ids=ids, adapter_names=["default", "typo"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        ours(input_ids=ids, adapter_names=["default"])
    layer = FastLoraLinear(IN, OUT, r=2)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\].*\['default'\]"):
        layer(torch.randn(2, IN), adapter_names=["default", "nope"])
    ours.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        ours(input_ids=ids, adapter_names=["default", "default"])


def test_several_adapters_round_trip_with_peft(tmp_path):
    ours, theirs = _models()
    ids = torch.randint(1, 96, (len(NAMES), 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expect = ours(input_ids=ids, adapter_names=NAMES).logits
    ours.save_pretrained(tmp_path / "ours")  # default at the root, the others in sub-folders (peft's layout)
    loaded = peft.PeftModel.from_pretrained(_fresh_base(), tmp_path / "ours")
    for name in ("second", "third"):
        loaded.load_adapter(tmp_path / "ours" / name, name)
    with torch.no_grad():
        assert_rel(loaded(input_ids=ids, adapter_names=NAMES).logits, expect, 1e-5, "peft loads ours")
    theirs.save_pretrained(tmp_path / "theirs")
    back = fastpeft.PeftModel.from_pretrained(_fresh_base(), tmp_path / "theirs")
    for name in ("second", "third"):
        back.load_adapter(tmp_path / "theirs" / name, name)
    with torch.no_grad():
        assert_rel(back(input_ids=ids, adapter_names=NAMES).logits, expect, 1e-5, "fastpeft loads peft's")


def test_mixed_benchmark_harness_runs_and_checks():
    from fastpeft import benchmarking

    rows = benchmarking.run_mixed("mixed-tiny", adapters=[3], rep_ms=1, warmup_ms=1, device="cpu")
    assert {r["provider"] for r in rows} == set(benchmarking.MIXED_PROVIDERS)
    mixed = [r for r in rows if r["provider"] == "fastpeft_mixed"]
    assert len(mixed) == 2 and all(r["check_ok"] is True for r in mixed)
    assert all(r["vs_single"] and r["vs_peft"] and r["vs_frozen"] for r in rows)
    assert "mixed" in benchmarking.format_mixed_table(rows)


def test_4bit_layer_mixed_batch_equals_each_adapter_alone(backend):
    from fastpeft.layers.lora4bit import FastLoraLinear4bit

    torch.manual_seed(7)
    layer = FastLoraLinear4bit.from_linear(torch.nn.Linear(64, 24), r=4, lora_alpha=8, init_lora_weights=False)
    layer.update_layer("b", r=2, lora_alpha=3, init_lora_weights=False, use_rslora=True)
    layer.set_adapter(["default", "b"])
    names = ["b", "__base__", "default", "b"]
    x = torch.randn(4, 5, 64, requires_grad=True)
    y = layer(x, adapter_names=names)
    dy = torch.randn(y.shape)
    y.backward(dy)
    got = {n: layer.lora_A[n].weight.grad.clone() for n in ("default", "b")}
    dx = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    for name in ("default", "b", "__base__"):
        rows = [i for i, n in enumerate(names) if n == name]
        if name == "__base__":
            with layer.disable_adapter():
                alone = layer(x[rows])
        else:
            layer.set_adapter(name)
            alone = layer(x[rows])
        assert_rel(y[rows], alone, 1e-5, name)
        alone.backward(dy[rows])
        if name != "__base__":
            assert_rel(got[name], layer.lora_A[name].weight.grad, 1e-5, f"dA {name}")
    assert_rel(dx, x.grad, 1e-5, "dx")


@pytest.mark.parametrize("quant_type", ["nf4", "int4"])
def test_4bit_mixed_training_keeps_no_dense_weight_and_equals_dense(backend, quant_type):
    """Mixed batches on a 4-bit base: same outputs, dropout masks and gradients as the dense op on the
    decoded weight, and nothing of the base's (out, in) size saved for backward."""
    from fastpeft.layers.lora4bit import FastLoraLinear4bit

    torch.manual_seed(3)
    q = FastLoraLinear4bit.from_linear(torch.nn.Linear(64, 24), r=4, lora_alpha=8, lora_dropout=0.2,
                                       init_lora_weights=False, quant_type=quant_type, blocksize=32)
    q.update_layer("b", r=2, lora_alpha=3, lora_dropout=0.1, init_lora_weights=False)
    dense = FastLoraLinear(64, 24, r=4, lora_alpha=8, lora_dropout=0.2)
    dense.update_layer("b", r=2, lora_alpha=3, lora_dropout=0.1)
    with torch.no_grad():
        dense.base_layer.weight.copy_(q.dequantized_weight())
        dense.base_layer.bias.copy_(q.base_layer.bias)
    dense.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" in k}, strict=False)
    names = ["b", "__base__", "default", "b", "default"]
    x = torch.randn(5, 3, 64)
    results = []
    for layer in (q, dense):
        layer.set_adapter(["default", "b"])  # both trainable
        layer.train()
        xi = x.clone().requires_grad_()
        saved: list = []

        def pack(t, saved=saved):
            saved.append(tuple(t.shape))
            return t

        torch.manual_seed(11)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(xi, adapter_names=names)
        y.backward(torch.ones_like(y))
        results.append((y, xi.grad, {k: p.grad for k, p in layer.named_parameters() if "lora_" in k}, saved))
    (yq, dxq, gq, saved_q), (yd, dxd, gd, saved_d) = results
    assert (24, 64) in saved_d and (24, 64) not in saved_q  # the dense op keeps W0 (its input); 4-bit: none
    assert_rel(yq, yd, 1e-5, "y")
    assert_rel(dxq, dxd, 1e-5, "dx")
    assert set(gq) == set(gd) and len(gq) == 4
    for k in gq:
        assert_rel(gq[k], gd[k], 1e-5, k)


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_compiles_without_graph_breaks(backend, base):
    As, Bs = _adapters((3, 5))
    W = torch.randn(OUT, IN)
    if base == "nf4":
        from fastpeft.quant import Weight4bit, quantize_linear

        W = Weight4bit.from_module(quantize_linear(torch.nn.Linear(IN, OUT, bias=False), "nf4", 64, True))

    def f(x, idx):
        return lora_linear_mixed(x, W, None, As, Bs, idx, scales=[1.0, 2.0])

    x, idx = torch.randn(3, 4, IN), torch.tensor([1, -1, 0])
    ref = f(x, idx)
    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True)(x, idx)
    assert_rel(y, ref, 1e-6, "compiled")
    y.sum().backward()
    assert As[0].grad is not None and As[0].grad.any()


# ----------------------------------------------------------------------------- modules_to_save, checkpointing
def _models_with_head(dropout=0.0):
    """Two adapters, each with its own trained copy of lm_head (modules_to_save), fastpeft and peft."""
    torch.manual_seed(0)
    base_a, base_b = _llama().eval(), _llama().eval()
    base_b.load_state_dict(base_a.state_dict())
    kws = {"default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                           lora_dropout=dropout),
           "other": dict(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], modules_to_save=["lm_head"],
                         lora_dropout=dropout)}
    ours = fastpeft.get_peft_model(base_a, fastpeft.LoraConfig(init_lora_weights=False, **kws["default"]))
    theirs = peft.get_peft_model(base_b, peft.LoraConfig(init_lora_weights=False, **kws["default"]))
    ours.add_adapter("other", fastpeft.LoraConfig(init_lora_weights=False, **kws["other"]))
    theirs.add_adapter("other", peft.LoraConfig(init_lora_weights=False, **kws["other"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # make every copy of the head differ from the original
        for name, p in ours.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k or "modules_to_save" in k]
    return ours, theirs


def test_modules_to_save_mixed_batch_equals_peft():
    ours, theirs = _models_with_head()
    ours.eval(), theirs.eval()
    names = ["other", "__base__", "default", "other"]
    ids = torch.randint(1, 96, (len(names), 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        la = ours(input_ids=ids, adapter_names=names).logits
        assert_rel(la, theirs(input_ids=ids, adapter_names=names).logits, 1e-5, "mixed logits with lm_head copies")
        _assert_rows_equal_each_adapter_alone(ours, ids, names, la)  # head copies included
    out_a = ours.generate(input_ids=ids, max_new_tokens=3, do_sample=False, num_beams=2, adapter_names=names)
    out_b = theirs.generate(input_ids=ids, max_new_tokens=3, do_sample=False, num_beams=2, adapter_names=names)
    assert torch.equal(out_a, out_b)


def _mixed_training_grads(model, names, ids, g, checkpointing=None):
    model.train()
    for name, p in model.named_parameters():  # both adapters (and both head copies) trainable
        p.requires_grad_("lora_" in name or "modules_to_save" in name)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    model.zero_grad()
    torch.manual_seed(11)
    (model(input_ids=ids, adapter_names=names).logits * g).sum().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_modules_to_save_mixed_training_grads_come_from_own_rows():
    ours, theirs = _models_with_head()
    names = ["other", "default", "__base__", "other"]
    ids = torch.randint(1, 96, (len(names), 5), generator=torch.Generator().manual_seed(9))
    g = torch.randn(len(names), 5, 96, generator=torch.Generator().manual_seed(10))
    grads = _mixed_training_grads(ours, names, ids, g)
    ref = {}
    theirs.train()
    for name in ("default", "other"):  # peft, each adapter on its own rows, separately
        rows = [i for i, n in enumerate(names) if n == name]
        theirs.set_adapter(name)
        theirs.zero_grad()
        (theirs(input_ids=ids[rows]).logits * g[rows]).sum().backward()
        ref.update({k: p.grad.clone() for k, p in theirs.named_parameters() if f".{name}." in k and p.grad is not None})
    assert set(grads) == set(ref) and any("modules_to_save" in k for k in ref)
    for k, grad in grads.items():
        assert_rel(grad, ref[k], 1e-4, k)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_replays_the_same_adapters_and_masks(reentrant, monkeypatch):
    ours, _ = _models_with_head(dropout=0.3)
    names = ["other", "default", "__base__", "default"]
    ids = torch.randint(1, 96, (len(names), 5), generator=torch.Generator().manual_seed(12))
    g = torch.randn(len(names), 5, 96, generator=torch.Generator().manual_seed(13))
    plain = _mixed_training_grads(ours, names, ids, g)
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in ours.modules()
               if isinstance(m, FastLoraLinear)]
    ckpt = _mixed_training_grads(ours, names, ids, g, checkpointing=reentrant)
    for h in handles:
        h.remove()
    n_layers = sum(isinstance(m, FastLoraLinear) for m in ours.modules())
    assert len(calls) > n_layers  # LoRA layers ran again in backward (non-reentrant may stop early)
    assert set(ckpt) == set(plain)
    for k in plain:  # same rows, same adapters, same dropout masks on the replay: bit-identical
        assert torch.equal(ckpt[k], plain[k]), k
    # negative control: a replay without the adapter names (the hooks gone) gives other gradients
    monkeypatch.setattr(fastpeft.model, "_replaying_checkpoint", lambda func, block, names: func)
    # (the non-reentrant one notices that the replay saved other tensors and raises)
    try:
        wrong = _mixed_training_grads(ours, names, ids, g, checkpointing=reentrant)
        assert any(not torch.equal(wrong[k], plain[k]) for k in plain)
    except torch.utils.checkpoint.CheckpointError:
        assert not reentrant
    ours.gradient_checkpointing_disable()


def test_layers_share_one_row_sort_per_batch(monkeypatch):
    ours, _ = _models()
    import fastpeft.ops_mixed as om
    calls = []
    real = om.sort_rows
    monkeypatch.setattr(om, "sort_rows", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(1, 96, (len(NAMES), 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expect = torch.stack([ours(input_ids=ids, adapter_names=NAMES).logits])  # cached path
    layers = [m for m in ours.modules() if isinstance(m, FastLoraLinear)]
    # one sort per distinct set of adapters a layer holds, not one per layer
    distinct = {tuple(n for n in dict.fromkeys(NAMES) if n in m.lora_A) for m in layers}
    assert len(calls) == len(distinct) < len(layers)
    calls.clear()
    class Checked(list):  # checked against the model, but without the shared cache
        _fastpeft_model_checked = True

    with torch.no_grad():  # the layers each sorting their own rows agree
        hooks = [m.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "adapter_names": Checked(NAMES)}),
                                             with_kwargs=True) for m in layers]
        plain = ours.base_model.model(input_ids=ids).logits
        for h in hooks:
            h.remove()
    assert len(calls) == len(layers)
    assert torch.equal(plain, expect[0])


# ----------------------------------------------------------------------------- compiled kernels on a GPU
def _mixed_grads64(x2d, W, b, As, Bs, index, scales, ps, seed, dy):
    """fp64 autograd reference on CPU: per adapter its rows, dropout keyed by the global row."""
    x64 = x2d.detach().cpu().double().requires_grad_()
    b64 = b.detach().cpu().double().requires_grad_()
    A64 = [A.detach().cpu().double().requires_grad_() for A in As]
    B64 = [B.detach().cpu().double().requires_grad_() for B in Bs]
    index = index.cpu()
    y = x64 @ W.detach().cpu().double().t() + b64
    for a in range(len(As)):
        rows = (index == a).nonzero().flatten()
        if rows.numel() == 0:
            continue
        xs = x64[rows]
        if ps[a] > 0:
            xs = xs * dropout_keep_rows(seed.cpu(), rows, x2d.shape[1], ps[a]).double() * keep_scale64(ps[a])
        y = y.index_add(0, rows, scales[a] * (xs @ A64[a].t()) @ B64[a].t())
    y.backward(dy.detach().cpu().double())
    return y.detach(), [x64.grad, b64.grad, *[A.grad for A in A64], *[B.grad for B in B64]]


def _check_mixed_vs_fp64(dev, dtype, p, base, monkeypatch, T=97, fin=320, fout=448):
    """The mixed kernels (forward, dx, per-adapter dA/dB, db) against fp64, by the tolerance rule with
    the PyTorch path in the same dtype on the same device as the low-precision yardstick. Ranks 1..64
    in one batch, a single-row adapter, base rows, row blocks straddling adapters."""
    from fastpeft.quant import Weight4bit, quantize_linear

    g = torch.Generator(device=dev).manual_seed(0)
    seq_idx = [1, -1, 0, 2, 1, 3, 0, 0]
    ranks, scales = (3, 16, 1, 64), [2.0, 0.5, 1.25, 0.25]
    ps = [p, p, 0.0, 2 * p]
    W = (torch.randn(fout, fin, device=dev, generator=g) / fin**0.5).to(dtype)
    if base == "nf4":
        lin = torch.nn.Linear(fin, fout, bias=False, device=dev)
        lin.weight.data.copy_(W.float())
        weight = Weight4bit.from_module(quantize_linear(lin, "nf4", 64, True))
        W_ref = weight.dequantize(torch.float32)
    else:
        weight = W_ref = W
    b = torch.randn(fout, device=dev, generator=g).to(dtype).requires_grad_()
    As = [(torch.randn(r, fin, device=dev, generator=g) / fin**0.5).requires_grad_() for r in ranks]
    Bs = [(torch.randn(fout, r, device=dev, generator=g) / r**0.5).requires_grad_() for r in ranks]
    x = torch.randn(len(seq_idx), T, fin, device=dev, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(len(seq_idx), T, fout, device=dev, generator=g).to(dtype)
    seed = torch.tensor([1234], dtype=torch.int64, device=dev)
    index = torch.tensor(seq_idx, device=dev)
    results = {}
    for backend_name in ("triton", "torch"):
        monkeypatch.setenv("FASTPEFT_BACKEND", backend_name)
        for t in (x, b, *As, *Bs):
            t.grad = None
        before = sum(v for k, v in LAUNCHES.items() if k.startswith("mixed_"))
        y = lora_linear_mixed(x, weight, b, As, Bs, index, scales=scales, dropout_ps=ps, seed=seed)
        y.backward(dy)
        launched = sum(v for k, v in LAUNCHES.items() if k.startswith("mixed_")) - before
        assert (launched > 0) == (backend_name == "triton")
        results[backend_name] = (y.detach(), [t.grad.clone() for t in (x, b, *As, *Bs)])
    y64, g64 = _mixed_grads64(x.reshape(-1, fin), W_ref, b, As, Bs, index.repeat_interleave(T), scales, ps, seed,
                              dy.reshape(-1, fout))
    (y, grads), (y_lp, grads_lp) = results["triton"], results["torch"]
    # the yardstick must itself be near fp64 (else a wrong reference would pass both alike)
    sane = 1e-5 if dtype == torch.float32 else 2e-2
    assert_rel(y_lp.reshape(-1, fout).cpu(), y64, sane, "torch-path y vs fp64")
    assert_rule(y.reshape(-1, fout).cpu(), y64, y_lp.reshape(-1, fout).cpu(), 2.0, "y")
    names = ["dx", "db", *[f"dA{a}" for a in range(len(ranks))], *[f"dB{a}" for a in range(len(ranks))]]
    for name, ours, ref, lp in zip(names, grads, g64, grads_lp):
        shape = ref.shape
        assert_rel(lp.reshape(shape).cpu(), ref, sane, f"torch-path {name} vs fp64")
        assert_rule(ours.reshape(shape).cpu(), ref, lp.reshape(shape).cpu(), 3.0, name)


@pytest.mark.interp
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_mixed_kernels_vs_fp64_interpreted(base, monkeypatch):
    _check_mixed_vs_fp64("cpu", torch.float32, 0.1, base, monkeypatch, T=5, fin=70, fout=90)


@pytest.mark.gpu
@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_mixed_kernels_vs_fp64(dtype, p, base, monkeypatch):
    _check_mixed_vs_fp64("cuda", dtype, p, base, monkeypatch)


def test_generate_stacks_each_layers_adapters_once(monkeypatch):
    import fastpeft.layers.lora as lora_mod
    import fastpeft.ops_mixed as om

    ours, theirs = _models()
    ids = torch.randint(1, 96, (3, 5), generator=torch.Generator().manual_seed(3))
    names = ["third", "__base__", "second"]
    calls, uncached = [], []
    real = om.stack_adapters
    monkeypatch.setattr(lora_mod, "stack_adapters", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(om, "stack_adapters", lambda *a: uncached.append(1) or real(*a))
    out = ours.generate(input_ids=ids, max_new_tokens=5, do_sample=False, adapter_names=names)
    layers = [m for m in ours.modules() if isinstance(m, FastLoraLinear) and set(names) & set(m.lora_A)]
    assert len(calls) == len(layers) and not uncached  # once per layer for the 5 steps, not per step
    assert torch.equal(out, theirs.generate(input_ids=ids, max_new_tokens=5, do_sample=False, adapter_names=names))
    with torch.no_grad():  # a later call stacks again (the cache lives for one call)
        ours(input_ids=ids, adapter_names=names)
    assert len(calls) == 2 * len(layers)


# ----------------------------------------------------------------------------- found in review
def test_modules_to_save_with_per_row_arguments_refuses_mixed_batches():
    """A decoder layer as modules_to_save gets per-row masks/positions beside its input: only the input
    could be split, so a mixed batch raises (peft raises too) instead of mixing rows up silently."""
    torch.manual_seed(0)
    ours = fastpeft.get_peft_model(_llama().eval(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                         modules_to_save=["layers.1"]))
    ours.add_adapter("other", fastpeft.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["layers.1"]))
    ids = torch.randint(1, 96, (2, 5))
    with torch.no_grad(), pytest.raises(TypeError, match="split only the first input by row.*cache"):
        ours(input_ids=ids, adapter_names=["other", "__base__"])
    with torch.no_grad():  # one adapter for every row needs no split: fine
        same = ours(input_ids=ids, adapter_names=["other", "other"]).logits
        ours.set_adapter("other")
        assert_rel(same, ours(input_ids=ids).logits, 1e-6, "one adapter")


def test_mixed_batch_on_weights_made_under_inference_mode():
    with torch.inference_mode():
        ours, theirs = _models()
    ids = torch.randint(1, 96, (len(NAMES), 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got = ours(input_ids=ids, adapter_names=NAMES).logits
        assert_rel(got, theirs(input_ids=ids, adapter_names=NAMES).logits, 1e-5, "inference-mode weights")
        out = ours.generate(input_ids=ids[:3], max_new_tokens=3, do_sample=False, adapter_names=NAMES[:3])
        assert torch.equal(out, theirs.generate(input_ids=ids[:3], max_new_tokens=3, do_sample=False,
                                                adapter_names=NAMES[:3]))


def _in_one_process_group(tmp_path, run) -> None:
    """``run()`` inside a one-process gloo group. Its DDP objects are gone (``run`` has returned) and every
    queued collective has finished (a barrier, which releases the GIL) before the group is destroyed: a
    DDP reducer freed after ``destroy_process_group`` drops the last reference to the group with the GIL
    held, and the group's destructor then joins a gloo thread that waits for the GIL (a hang seen in CI)."""
    import gc

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        run()
    finally:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def test_ddp_training_with_an_adapter_missing_from_a_batch(tmp_path):
    """Trainable adapters without rows in a batch get zero gradients, not none: DDP (default
    find_unused_parameters=False) keeps training when a batch lacks an adapter."""
    ours, _ = _models()
    ours.train()
    for name, p in ours.named_parameters():
        p.requires_grad_("lora_" in name)

    def run():
        ddp = torch.nn.parallel.DistributedDataParallel(ours)
        opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
        ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(4))
        for names in (["default", "second"], ["default", "default"], ["third", "__base__"], ["second", "third"]):
            ddp(input_ids=ids, adapter_names=names, labels=ids).loss.backward()
            for key, p in ours.named_parameters():
                if p.requires_grad:
                    used = any(f".{n}." in key for n in names)
                    assert p.grad is not None, key
                    assert bool(p.grad.any()) == used, key  # zeros exactly where the batch lacks it
            opt.step()
            opt.zero_grad()

    _in_one_process_group(tmp_path, run)


def test_ddp_training_with_a_modules_to_save_copy_missing_from_a_batch(tmp_path):
    """A trainable modules_to_save copy (here lm_head's) without rows in a batch runs on zero rows: zero
    gradients, not None, so DDP with find_unused_parameters=False trains on."""
    ours, _ = _models_with_head()
    ours.train()
    for name, p in ours.named_parameters():
        p.requires_grad_("lora_" in name or "modules_to_save" in name)

    def run():
        ddp = torch.nn.parallel.DistributedDataParallel(ours)
        ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(5))
        for names in (["default", "default"], ["other", "__base__"], ["default", "other"]):
            ddp(input_ids=ids, adapter_names=names, labels=ids).loss.backward()
            copies = {k: p for k, p in ours.named_parameters() if "modules_to_save" in k and p.requires_grad}
            assert copies
            for key, p in copies.items():
                used = any(f".{n}." in key for n in names)
                assert p.grad is not None, key
                assert bool(p.grad.any()) == used, key
            ours.zero_grad(set_to_none=True)

    _in_one_process_group(tmp_path, run)
