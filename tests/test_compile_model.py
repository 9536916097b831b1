"""``torch.compile`` over a whole model with fastpeft layers: one graph, same outputs and gradients.

A tiny Llama wrapped by ``fastpeft.get_peft_model`` (LoRA on every linear layer, dropout on) is compiled
with ``fullgraph=True`` — any graph break is an error — and compared with eager on the same inputs and
the same RNG state. ``aot_eager`` traces through the fake kernels and the registered autograd exactly
as Inductor does but runs the ops eagerly, so compiled and eager agree bit for bit; Inductor itself
(C++ codegen on CPU, skipped without a compiler) reorders sums, so it is held to the fp32 tolerance,
with ``fallback_random`` so that its random numbers (the dropout seed) come from torch's generator.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import fastpeft
from helpers import assert_rel, assert_rule

transformers = pytest.importorskip("transformers")

V = 96


def _peft_llama(layers: int = 2, dropout: float = 0.1, dtype=torch.float32, device="cpu"):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    config = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout,
                                 init_lora_weights=False)  # B ≠ 0: the adapters change the output
    return fastpeft.get_peft_model(model, config).train()


def _step(module, model, ids, seed=1):
    """Forward + backward from a fixed RNG state: (loss, logits, {name: grad of each LoRA parameter})."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = module(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


def _ids(device="cpu"):
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(5)).to(device)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _count_fastpeft_ops(model, ids) -> tuple[int, int]:
    """(graph breaks, fastpeft::lora_linear calls in the captured graphs) from dynamo's view of a forward."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(input_ids=ids)
    torch._dynamo.reset()
    torch.compile(model, backend=capture, fullgraph=True)(input_ids=ids)
    calls = sum(1 for gm in graphs for node in gm.graph.nodes
                if node.op == "call_function" and "fastpeft" in str(node.target) and "lora_linear" in str(node.target))
    return explain.graph_break_count, calls


def test_model_is_one_graph_with_the_fused_ops_inside():
    """No graph break anywhere; each of the 14 LoRA layers appears as one fastpeft::lora_linear call."""
    model = _peft_llama()
    breaks, calls = _count_fastpeft_ops(model, _ids())
    assert breaks == 0
    assert calls == 14  # 2 layers × (q, k, v, o, gate, up, down)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_compiled_model_equals_eager_with_dropout(backend_name, monkeypatch):
    """fullgraph aot_eager over the whole model, p = 0.1: loss, logits and LoRA grads equal eager's exactly.

    ``triton`` runs the kernels in Triton's interpreter (the op body calls the launchers), ``torch`` the
    reference; on each, the dropout seed drawn inside the compiled graph is the one eager draws.
    """
    monkeypatch.setenv("FASTPEFT_BACKEND", backend_name)
    model = _peft_llama(layers=1 if backend_name == "triton" else 2)
    ids = _ids()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c, logits_c, grads_c = _step(compiled, model, ids)
    loss_e, logits_e, grads_e = _step(model, model, ids)
    assert torch.equal(loss_c, loss_e) and torch.equal(logits_c, logits_e)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 0
    for name in grads_e:
        assert torch.count_nonzero(grads_e[name]) > 0, name
        assert torch.equal(grads_c[name], grads_e[name]), name
    # Dropout really acts: another seed gives another loss (so the equalities above are not vacuous).
    assert not torch.equal(_step(model, model, ids, seed=2)[0], loss_e)
    # A second call with the same shapes reuses the graph (no recompilation).
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss_c2, _, _ = _step(compiled, model, ids)
    assert torch.equal(loss_c2, loss_e)
    # eval mode: dropout off, still one graph
    model.eval()
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_compiled_mixed_adapter_batch_is_one_graph_and_equals_eager(backend_name, monkeypatch):
    """``adapter_names`` through a fullgraph-compiled model (aot_eager), dropout on: loss, logits and each
    adapter's gradients equal eager's exactly; the same names again reuse the graph."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend_name)
    model = _peft_llama(layers=1 if backend_name == "triton" else 2)
    model.add_adapter("other", fastpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.2, init_lora_weights=False))
    for name, p in model.named_parameters():  # both adapters train
        p.requires_grad_("lora_" in name)
    ids = _ids()
    ids = torch.cat([ids, ids.flip(0)])
    names = ["other", "default", "__base__", "other"]

    def step(module, seed=1):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = module(input_ids=ids, labels=ids, adapter_names=names)
        out.loss.backward()
        return out.loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                        if p.grad is not None}

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c, logits_c, grads_c = step(compiled)
    loss_e, logits_e, grads_e = step(model)
    assert torch.equal(loss_c, loss_e) and torch.equal(logits_c, logits_e)
    assert grads_c.keys() == grads_e.keys() and any(".other." in k for k in grads_e)
    for name in grads_e:
        assert torch.count_nonzero(grads_e[name]) > 0, name
        assert torch.equal(grads_c[name], grads_e[name]), name
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(step(compiled)[0], loss_e)
    model.eval()
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids, adapter_names=names).logits,
                           model(input_ids=ids, adapter_names=names).logits)
    # the names are gone after the call: a plain call runs the active adapter alone
    assert all(m._fastpeft_adapter_names is None for m in model.modules()
               if isinstance(m, fastpeft.FastLoraLinear))


def _have_cxx() -> bool:
    try:
        from torch._inductor import config as inductor_config

        cxx = inductor_config.cpp.cxx[0] if isinstance(inductor_config.cpp.cxx, tuple) else inductor_config.cpp.cxx
    except Exception:
        cxx = None
    return shutil.which(cxx or "g++") is not None or shutil.which("g++") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _have_cxx(), reason="Inductor's CPU backend needs a C++ compiler")
def test_inductor_model_matches_eager(monkeypatch):
    """Inductor (C++ on CPU), fullgraph, dropout on with ``fallback_random``: fp32 tolerance vs eager."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    model = _peft_llama(layers=1)
    ids = _ids()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, backend="inductor", fullgraph=True)
        loss_c, logits_c, grads_c = _step(compiled, model, ids)
    loss_e, logits_e, grads_e = _step(model, model, ids)
    assert_rel(loss_c, loss_e, 1e-5, "loss")
    assert_rel(logits_c, logits_e, 1e-5, "logits")
    for name in grads_e:
        assert_rel(grads_c[name], grads_e[name], 1e-5, name)


def test_qlora_model_compiles():
    """A model with fastpeft's 4-bit LoRA layers (NF4 base) compiles with fullgraph and matches eager."""
    bnb = pytest.importorskip("bitsandbytes")
    lora4bit = pytest.importorskip("fastpeft.layers.lora4bit")
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(cfg)
    for name, module in list(plain.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4")
            parent, child = name.rsplit(".", 1)
            setattr(plain.model.layers.get_submodule(parent), child, q.to("cpu"))
    lora_cfg = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = fastpeft.get_peft_model(plain, lora_cfg).train()
    assert sum(isinstance(m, lora4bit.FastLoraLinear4bit) for m in model.modules()) == 7
    ids = _ids()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c, logits_c, grads_c = _step(compiled, model, ids)
    loss_e, logits_e, grads_e = _step(model, model, ids)
    assert_rel(logits_c, logits_e, 1e-6, "logits")
    for name in grads_e:
        assert torch.count_nonzero(grads_e[name]) > 0, name
        assert_rel(grads_c[name], grads_e[name], 1e-6, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_triton_model_matches_eager_on_gpu(dtype, monkeypatch):
    """On a GPU: Inductor over the model with the Triton kernels inside, dropout on (fallback_random).

    fp32: compiled vs eager within 1e-5. bf16: the tolerance rule against the same model in fp32 (same
    weights, same seeds, so the same masks), with eager bf16 as the low-precision baseline — Inductor
    keeps some intermediates in fp32, so it may be more accurate than eager but not less.
    """
    monkeypatch.setenv("FASTPEFT_BACKEND", "auto")
    model = _peft_llama(layers=2, dtype=dtype, device="cuda")
    ids = _ids("cuda")
    assert fastpeft.backend_for(torch.empty(1, device="cuda", dtype=dtype)) == "triton"
    breaks, calls = _count_fastpeft_ops(model, ids)
    assert (breaks, calls) == (0, 14)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, backend="inductor", fullgraph=True)
        loss_c, logits_c, grads_c = _step(compiled, model, ids)
    loss_e, logits_e, grads_e = _step(model, model, ids)
    if dtype == torch.float32:
        assert_rel(logits_c, logits_e, 1e-5, "logits")
        for name in grads_e:
            assert_rel(grads_c[name], grads_e[name], 1e-5, name)
        return
    ref_model = _peft_llama(layers=2, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        for (n, p), (n32, p32) in zip(model.named_parameters(), ref_model.named_parameters()):
            assert n == n32
            p32.copy_(p)  # the bf16 model's values (rounded base, fp32 adapters), computed in fp32
    _, logits_r, grads_r = _step(ref_model, ref_model, ids)
    assert_rule(logits_c, logits_r, logits_e, name="logits")
    for name in grads_e:
        assert_rule(grads_c[name], grads_r[name], grads_e[name], 3.0, name)
