"""nn.Module habits a peft user relies on (found in the session-13 hunt, each against peft 0.21.2): hooks on a LoRA
layer's submodules fire, accelerate offloading applied after wrapping computes the right outputs, a base weight
made trainable trains (peft's unfused path), and attributes read through a ``modules_to_save`` wrapper come from the
active adapter's copy."""

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402

CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _pair(**kw):
    """peft's and fastpeft's model on the same base, with the same (nonzero) adapter weights."""
    cfg = {**CFG, **kw}
    pm = peft.get_peft_model(_llama(), peft.LoraConfig(**cfg))
    fm = fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(5)
    ours = dict(fm.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                ours[n].copy_(p)
    return pm, fm


def _ids(b=2, t=8):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(3))


def _q(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("where", ["base_layer", "lora_A", "lora_B", "lora_dropout"])
def test_hooks_on_lora_submodules_fire_and_act_as_in_peft(backend, where):
    """A forward hook on ``q_proj.base_layer`` (or the adapter's lora_A / lora_B / lora_dropout) fires, and a hook
    that changes the output changes the logits exactly as in peft; removing it restores the fused path."""
    pm, fm = _pair()
    x = _ids()
    with torch.no_grad():
        before = {n: m(x).logits for n, m in (("peft", pm), ("ours", fm))}
    changed, fired = {}, []

    def hook(mod, inp, out):
        fired.append(type(mod).__name__)
        return out * 0.5

    for n, m in (("peft", pm), ("ours", fm)):
        sub = getattr(_q(m), where)
        handle = (sub if where == "base_layer" else sub["default"]).register_forward_hook(hook)
        with torch.no_grad():
            changed[n] = m(x).logits
        handle.remove()
    assert len(fired) == 2
    delta_p, delta_o = changed["peft"] - before["peft"], changed["ours"] - before["ours"]
    assert delta_p.abs().max() > 1e-4
    torch.testing.assert_close(delta_o, delta_p, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fm(x).logits, before["ours"])


def test_backward_hook_on_lora_B_sees_peft_gradient():
    pm, fm = _pair()
    x = _ids()
    seen = {}
    for n, m in (("peft", pm), ("ours", fm)):
        lb = _q(m).lora_B["default"]
        handle = lb.register_full_backward_hook(lambda mod, gi, go, n=n: seen.__setitem__(n, go[0].clone()))
        m(x).logits.sum().backward()
        handle.remove()
    torch.testing.assert_close(seen["ours"], seen["peft"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("how", ["cpu_offload", "disk"])
def test_accelerate_offload_applied_after_wrapping(how, tmp_path):
    """``accelerate.cpu_offload`` / ``dispatch_model`` with a disk entry on an already-wrapped model: the base weights
    wait on the meta device, the layers run the base's hooked forward (fastpeft used to multiply by the meta
    placeholder: logits 0.75–1.05 off)."""
    accelerate = pytest.importorskip("accelerate")
    _, fm = _pair()
    x = _ids()
    with torch.no_grad():
        ref = fm(x).logits.clone()
    if how == "cpu_offload":
        accelerate.cpu_offload(fm, execution_device=torch.device("cpu"))
    else:
        pre = "base_model.model."
        dmap = {pre + "model.embed_tokens": "cpu", pre + "model.layers.0": "disk", pre + "model.layers.1": "cpu",
                pre + "model.norm": "cpu", pre + "model.rotary_emb": "cpu", pre + "lm_head": "cpu"}
        fm = accelerate.dispatch_model(fm, device_map=dmap, main_device="cpu", offload_dir=str(tmp_path))
    assert _q(fm).base_layer.weight.device.type == "meta"
    with torch.no_grad():
        torch.testing.assert_close(fm(x).logits, ref, rtol=1e-5, atol=1e-6)


def test_trainable_base_weight_trains_as_in_peft():
    """``base_layer.weight.requires_grad_(True)``: peft trains it; fastpeft runs that layer unfused (one warning)
    and gives peft's gradients (it raised before)."""
    pm, fm = _pair()
    x = _ids()
    for m in (pm, fm):
        _q(m).base_layer.weight.requires_grad_(True)
    pm(x).logits.sum().backward()
    import fastpeft.layers.lora as L

    L._TRAINABLE_BASE_WARNED.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fm(x).logits.sum().backward()
    assert sum("base weight requires grad" in str(w.message) for w in rec) == 1
    for n in ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight"):
        torch.testing.assert_close(_q(fm).get_submodule(n.rsplit(".", 1)[0]).weight.grad,
                                   _q(pm).get_submodule(n.rsplit(".", 1)[0]).weight.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: the fused path again
        torch.testing.assert_close(fm(x).logits, pm(x).logits, rtol=1e-5, atol=1e-5)


def test_modules_to_save_attributes_come_from_the_active_copy():
    """``model.lm_head.weight`` through peft's wrapper is the active adapter's trainable copy (what a fused
    linear-cross-entropy loss reads); with the adapters disabled, the original."""
    _, fm = _pair(modules_to_save=["lm_head"])
    head = fm.base_model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    assert head.weight is head.modules_to_save["default"].weight and head.weight.requires_grad
    assert head.out_features == 128
    out = fm(_ids(), output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1] @ head.weight.t(), out.logits)
    with fm.disable_adapter():
        assert head.weight is head.original_module.weight


def test_peft_type_is_an_enum_as_in_peft(tmp_path):
    """``config.peft_type`` is a ``PeftType`` member (peft's habit ``config.peft_type.value``, which transformers'
    Trainer reads), equal to its string and to peft's member, written to adapter_config.json as the plain string,
    and ``str()`` / f-strings give the value on every Python version."""
    import json

    configs = [fastpeft.LoraConfig(), fastpeft.PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
               fastpeft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), fastpeft.IA3Config(),
               fastpeft.AdaLoraConfig(total_step=10), fastpeft.PromptTuningConfig(num_virtual_tokens=4)]
    for cfg in configs:
        value = cfg.peft_type.value
        assert isinstance(cfg.peft_type, fastpeft.PeftType)
        assert cfg.peft_type == value == getattr(peft.PeftType, value) and str(cfg.peft_type) == f"{cfg.peft_type}"
        assert str(cfg.peft_type) == value
        folder = tmp_path / value
        cfg.save_pretrained(str(folder))
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == value
        assert type(cfg).from_pretrained(str(folder)).peft_type is cfg.peft_type
    model = fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(target_modules=["q_proj"]))
    assert model.peft_type.value == "LORA" and model.peft_config["default"].peft_type.value == "LORA"


def test_deepcopy_keeps_tied_adapters_tied():
    """``copy.deepcopy`` of an ``ensure_weight_tying`` model: the copy's head adapter still shares memory with its
    embeddings' adapter, so after training the copy its saved adapter reloads to the trained copy (the copy used
    to untie them: 3.6 logits off; peft's deepcopy raises)."""
    import copy
    import tempfile

    def model():
        torch.manual_seed(1)
        base = _llama()
        base.config.tie_word_embeddings = True
        base.lm_head.weight = base.model.embed_tokens.weight
        return base

    m = fastpeft.get_peft_model(model(), fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                             ensure_weight_tying=True))
    c = copy.deepcopy(m)
    head, emb = c.base_model.model.lm_head, c.base_model.model.model.embed_tokens
    assert head.lora_A["default"].weight.untyped_storage().data_ptr() == \
        emb.lora_embedding_B["default"].untyped_storage().data_ptr()
    assert c.base_model.model.lm_head.base_layer.weight is emb.base_layer.weight  # the base's own tie too
    c.train()
    opt = torch.optim.SGD([p for p in c.parameters() if p.requires_grad], lr=0.5)
    x = _ids()
    for _ in range(2):
        c(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(head.lora_B["default"].weight, emb.lora_embedding_A["default"].t())
    c.eval()
    with tempfile.TemporaryDirectory() as d:
        c.save_pretrained(d)
        r = fastpeft.PeftModel.from_pretrained(model(), d).eval()
        with torch.no_grad():
            torch.testing.assert_close(r(x).logits, c(x).logits)
    # the original is untouched by the copy's training
    assert not torch.equal(m.base_model.model.model.embed_tokens.lora_embedding_A["default"],
                           emb.lora_embedding_A["default"])


@pytest.mark.parametrize("saved,lora", [("embed_tokens", "lm_head"), ("lm_head", "embed_tokens")])
def test_merge_into_a_tied_pair_with_modules_to_save_unties_first(saved, lora):
    """A tied Llama with one half of the pair in ``modules_to_save`` and LoRA on the other: merging gives the LoRA
    side its own weight first (the shared original stays the base's; config untied), and unmerging restores the
    weights exactly. (Reading ``.weight`` through the wrapper gives the active copy since this session; the tie
    checks read the original underneath, else the merge wrote the delta into the shared weight: 0.32 off.)"""
    torch.manual_seed(0)
    base = _llama()
    base.config.tie_word_embeddings = True
    base.lm_head.weight = base.model.embed_tokens.weight
    shared = base.model.embed_tokens.weight.detach().clone()
    m = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=[lora, "q_proj"],
                                                          modules_to_save=[saved], init_lora_weights=False))
    inner = m.base_model.model
    wrapper = inner.lm_head if saved == "lm_head" else inner.model.embed_tokens
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(0.1)
        x = _ids()
        before = m(x).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.merge_adapter()
        torch.testing.assert_close(m(x).logits, before, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(wrapper.original_module.weight, shared, rtol=0, atol=0)
        assert inner.config.tie_word_embeddings is False
        m.unmerge_adapter()
        torch.testing.assert_close(wrapper.original_module.weight, shared, rtol=0, atol=0)


def test_device_alignment_hooks_keep_weights_mergeable():
    """A model whose layers carry accelerate hooks that only align devices (a model split over GPUs: weights
    resident) before wrapping: the layers still merge, as in peft (they were refused as if offloaded); the
    hooked forward still runs."""
    pytest.importorskip("accelerate")
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    base = _llama()
    calls = []
    for layer in base.model.layers:
        add_hook_to_module(layer.self_attn.q_proj, AlignDevicesHook(execution_device=torch.device("cpu"),
                                                                    io_same_device=True))
        layer.self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(1)
    fm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(**CFG, init_lora_weights=False))
    x = _ids()
    with torch.no_grad():
        ref = fm(x).logits.clone()
        assert len(calls) == 2
        merged = fm.merge_and_unload()
        torch.testing.assert_close(merged(x).logits, ref, rtol=1e-4, atol=1e-5)


def test_merge_after_offloading_is_refused_before_anything_merges():
    """accelerate offloading applied after wrapping: merging refuses with a clear error (it wrote the delta into
    the meta placeholder and silently dropped the adapters), before any layer merged (no half-merged model)."""
    accelerate = pytest.importorskip("accelerate")
    _, fm = _pair()
    layers = fm.base_model.model.model.layers
    accelerate.cpu_offload(layers[1], execution_device=torch.device("cpu"))
    x = _ids()
    with torch.no_grad():
        before = fm(x).logits.clone()
    for call in (fm.merge_adapter, fm.merge_and_unload):
        with pytest.raises(TypeError, match="accelerate offloads the base layer"):
            call()
        assert layers[0].self_attn.q_proj.merged_adapters == []
    with torch.no_grad():
        torch.testing.assert_close(fm(x).logits, before)
