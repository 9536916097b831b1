"""Hot-swapping LoRA adapters (``fastpeft.hotswap_adapter``, peft's ``peft.utils.hotswap``), against peft.

Each adapter is saved once (by fastpeft, in peft's format); the reference for "the model after swapping in
adapter k" is peft itself loading adapter k onto a fresh copy of the base. A compiled model must give the same
logits after every swap without recompiling (``error_on_recompile``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastpeft
from helpers import assert_rel, tiny_llama, tiny_qwen3_moe

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = 96
IDS = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(5))


def _base():
    torch.manual_seed(0)
    return tiny_llama(V).eval()


def _save(tmp_path, name, seed, **config):
    """Save a fastpeft adapter with random (non-zero) factors; returns its folder."""
    config.setdefault("init_lora_weights", False)
    torch.manual_seed(seed)
    model = fastpeft.get_peft_model(_base(), fastpeft.LoraConfig(**config))
    with torch.no_grad():  # B ≠ 0 everywhere, biases too
        for n, p in model.named_parameters():
            if p.requires_grad and ("lora_" in n or "modules_to_save" in n):
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / name
    model.save_pretrained(path)
    return path


def _peft_logits(path, base=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(base if base is not None else _base(), path).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastpeft.PeftModel.from_pretrained(_base(), path).eval()


QV = ["q_proj", "v_proj"]


@pytest.fixture
def adapters(tmp_path):
    return {
        "a": _save(tmp_path, "a", 1, r=4, lora_alpha=8, target_modules=QV),
        "b": _save(tmp_path, "b", 2, r=4, lora_alpha=8, target_modules=QV),
        "wide": _save(tmp_path, "wide", 3, r=8, lora_alpha=4, target_modules=QV,
                      rank_pattern={"v_proj": 6}),
        "narrow": _save(tmp_path, "narrow", 4, r=2, lora_alpha=16, target_modules=["q_proj"]),
    }


def test_same_rank_swap_equals_loading_the_new_adapter(adapters):
    model = _load(adapters["a"])
    assert_rel(_logits(model), _peft_logits(adapters["a"]), 1e-6, "before")
    fastpeft.hotswap_adapter(model, adapters["b"], adapter_name="default", torch_device="cpu")
    assert_rel(_logits(model), _peft_logits(adapters["b"]), 1e-6, "after")
    saved = fastpeft.load_peft_weights(adapters["b"], device="cpu")
    for key, value in saved.items():  # the tensors are the file's, exactly
        layer_key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight",
                                                                                       ".lora_B.default.weight")
        assert torch.equal(model.state_dict()[layer_key], value), key


def test_unprepared_swaps_across_ranks_alphas_patterns_and_fewer_targets(adapters):
    """Without preparation the new ranks and scales are taken exactly (layer r updated); a module the new adapter
    does not target adds nothing; rank_pattern gives each module its own scale (matched on the module name;
    alpha_pattern must be equal, peft's rule)."""
    model = _load(adapters["a"])
    for name in ("wide", "narrow", "a"):
        fastpeft.hotswap_adapter(model, adapters[name], adapter_name="default", torch_device="cpu")
        assert_rel(_logits(model), _peft_logits(adapters[name]), 1e-6, name)
    layer = model.base_model.model.model.layers[0].self_attn
    fastpeft.hotswap_adapter(model, adapters["wide"], adapter_name="default", torch_device="cpu")
    assert (layer.q_proj.r["default"], layer.v_proj.r["default"]) == (8, 6)
    assert layer.q_proj.scaling["default"] == 4 / 8 and layer.v_proj.scaling["default"] == 4 / 6


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_prepared_compiled_model_swaps_without_recompiling(adapters, backend):
    model = _load(adapters["a"])
    fastpeft.prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    assert model.peft_config["default"].r == 8  # peft's bookkeeping
    assert_rel(_logits(model), _peft_logits(adapters["a"]), 1e-6, "padding changes nothing")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    try:
        assert_rel(_logits(compiled), _peft_logits(adapters["a"]), 1e-6, "compiled a")
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("b", "wide", "narrow", "a"):
                fastpeft.hotswap_adapter(compiled, adapters[name], adapter_name="default", torch_device="cpu")
                assert_rel(_logits(compiled), _peft_logits(adapters[name]), 1e-6, f"compiled {name}")
    finally:
        torch._dynamo.reset()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape == (8, 32) and layer.scaling["default"] == 2.0  # fixed: 8/4


def test_prepared_model_refuses_a_rank_above_the_target_and_changes_nothing(adapters):
    model = _load(adapters["a"])
    fastpeft.prepare_model_for_compiled_hotswap(model, target_rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="target_rank of at least 8"):
        fastpeft.hotswap_adapter(model, adapters["wide"], adapter_name="default", torch_device="cpu")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert_rel(_logits(model), _peft_logits(adapters["a"]), 1e-6, "unchanged")


def test_peft_hotswap_gives_the_same_model(adapters):
    """peft's own hotswap_adapter on a peft model and fastpeft's on a fastpeft model agree (same-rank swap and
    an unprepared swap to a larger rank, the cases where peft's rules and fastpeft's coincide)."""
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    ours = _load(adapters["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_base(), adapters["a"]).eval()
    for name in ("b", "narrow"):
        fastpeft.hotswap_adapter(ours, adapters[name], adapter_name="default", torch_device="cpu")
        peft_hotswap(theirs, adapters[name], adapter_name="default", torch_device="cpu")
        assert_rel(_logits(ours), _logits(theirs), 1e-6, name)


def test_dora_lora_bias_and_embedding_swaps(tmp_path):
    """DoRA (a layer the new adapter skips gets a neutral magnitude), lora_bias (the folded scale reaches the
    bias) and an embedding target, on a prepared model."""
    targets = ["q_proj", "v_proj", "embed_tokens"]
    paths = {
        "dora": _save(tmp_path, "dora", 1, r=4, lora_alpha=8, target_modules=QV, use_dora=True),
        "dora2": _save(tmp_path, "dora2", 2, r=2, lora_alpha=2, target_modules=["v_proj"], use_dora=True),
        "bias": _save(tmp_path, "bias", 3, r=4, lora_alpha=8, target_modules=QV, lora_bias=True),
        "bias2": _save(tmp_path, "bias2", 4, r=2, lora_alpha=6, target_modules=QV, lora_bias=True),
        "emb": _save(tmp_path, "emb", 5, r=4, lora_alpha=8, target_modules=targets),
        "emb2": _save(tmp_path, "emb2", 6, r=3, lora_alpha=5, target_modules=targets),
    }
    for first, second in (("dora", "dora2"), ("bias", "bias2"), ("emb", "emb2")):
        model = _load(paths[first])
        fastpeft.prepare_model_for_compiled_hotswap(model, target_rank=4)
        for name in (second, first, second):
            fastpeft.hotswap_adapter(model, paths[name], adapter_name="default", torch_device="cpu")
            assert_rel(_logits(model), _peft_logits(paths[name]), 1e-6, name)


def _moe_base():
    """A tiny one-layer Qwen3-MoE (4 experts) with fixed weights."""
    return tiny_qwen3_moe(V, num_hidden_layers=1)


def test_target_parameters_padding_keeps_the_expert_layout(tmp_path):
    """LoRA on MoE expert parameters (A: experts × r rows, B: r × experts columns): padded and swapped."""
    base = _moe_base
    paths = {}
    for name, seed, r, alpha in (("x", 1, 2, 4), ("y", 2, 3, 2)):
        torch.manual_seed(seed)
        model = fastpeft.get_peft_model(base(), fastpeft.LoraConfig(
            r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=["q_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        paths[name] = tmp_path / name
        model.save_pretrained(paths[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastpeft.PeftModel.from_pretrained(base(), paths["x"]).eval()
    fastpeft.prepare_model_for_compiled_hotswap(model, target_rank=3)
    assert_rel(_logits(model), _peft_logits(paths["x"], base()), 1e-6, "padded")
    for name in ("y", "x"):
        fastpeft.hotswap_adapter(model, paths[name], adapter_name="default", torch_device="cpu")
        assert_rel(_logits(model), _peft_logits(paths[name], base()), 1e-6, name)


def test_modules_to_save_are_swapped_and_required(tmp_path):
    one = _save(tmp_path, "one", 1, r=4, lora_alpha=8, target_modules=QV, modules_to_save=["lm_head"])
    two = _save(tmp_path, "two", 2, r=4, lora_alpha=8, target_modules=QV, modules_to_save=["lm_head"])
    bare = _save(tmp_path, "bare", 3, r=4, lora_alpha=8, target_modules=QV)
    model = _load(one)
    fastpeft.hotswap_adapter(model, two, adapter_name="default", torch_device="cpu")
    assert_rel(_logits(model), _peft_logits(two), 1e-6, "modules_to_save")
    with pytest.raises(ValueError, match="modules_to_save"):
        fastpeft.hotswap_adapter(model, bare, adapter_name="default", torch_device="cpu")
    assert_rel(_logits(model), _peft_logits(two), 1e-6, "unchanged after the refusal")


def test_errors(tmp_path, adapters):
    model = _load(adapters["a"])
    rs = _save(tmp_path, "rs", 7, r=4, lora_alpha=8, target_modules=QV, use_rslora=True)
    with pytest.raises(ValueError, match="Configs are incompatible: for use_rslora"):
        fastpeft.hotswap_adapter(model, rs, adapter_name="default", torch_device="cpu")
    more = _save(tmp_path, "more", 8, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])
    with pytest.raises(RuntimeError, match="unexpected keys found: .*k_proj"):
        fastpeft.hotswap_adapter(model, more, adapter_name="default", torch_device="cpu")
    with pytest.raises(ValueError, match=r"no adapter 'other' to hot-swap; this model has \['default'\]"):
        fastpeft.hotswap_adapter(model, adapters["b"], adapter_name="other", torch_device="cpu")
    with pytest.raises(TypeError, match="does not take"):
        fastpeft.hotswap_adapter(model, adapters["b"], adapter_name="default", torch_device="cpu", bogus=1)
    model.merge_adapter()
    with pytest.raises(ValueError, match="currently merged"):
        fastpeft.hotswap_adapter(model, adapters["b"], adapter_name="default", torch_device="cpu")
    model.unmerge_adapter()
    with pytest.raises(ValueError, match="rank is larger"):
        fastpeft.prepare_model_for_compiled_hotswap(model, target_rank=2)
    with pytest.raises(ValueError, match="No adapter layers"):
        fastpeft.prepare_model_for_compiled_hotswap(_base())
    with pytest.raises(ValueError, match="check_compiled"):
        fastpeft.prepare_model_for_compiled_hotswap(model, check_compiled="loud")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(ValueError, match="before"):
        fastpeft.prepare_model_for_compiled_hotswap(compiled)
    with pytest.warns(UserWarning, match="already compiled"):
        fastpeft.prepare_model_for_compiled_hotswap(compiled, check_compiled="warn")
    torch._dynamo.reset()


def test_config_check_matches_peft_on_peft_and_fastpeft_configs():
    ok = dict(r=4, target_modules=QV)
    fastpeft.check_hotswap_configs_compatible(fastpeft.LoraConfig(**ok), peft.LoraConfig(r=16, target_modules=QV))
    for field, value in (("use_rslora", True), ("lora_dropout", 0.1), ("use_dora", True),
                         ("alpha_pattern", {"q_proj": 2})):
        for make in (fastpeft.LoraConfig, peft.LoraConfig):
            with pytest.raises(ValueError, match=f"for {field}"):
                fastpeft.check_hotswap_configs_compatible(fastpeft.LoraConfig(**ok), make(**ok, **{field: value}))
            from peft.utils.hotswap import check_hotswap_configs_compatible as peft_check

            with pytest.raises(ValueError, match=f"for {field}"):
                peft_check(peft.LoraConfig(**ok), peft.LoraConfig(**ok, **{field: value}))
    with pytest.raises(ValueError, match="Incompatible PEFT types"):
        fastpeft.check_hotswap_configs_compatible(fastpeft.LoraConfig(**ok), peft.IA3Config(target_modules=QV))


def test_4bit_base(adapters):
    """A 4-bit (NF4, fastpeft's own quantization) base: the swapped model equals one loaded with the new adapter."""
    def base4():
        return fastpeft.quantize_model(_base(), progressbar=False)

    def load(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fastpeft.PeftModel.from_pretrained(base4(), path).eval()

    model = load(adapters["a"])
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "FastLoraLinear4bit"
    fastpeft.prepare_model_for_compiled_hotswap(model, target_rank=8)
    for name in ("wide", "narrow"):
        fastpeft.hotswap_adapter(model, adapters[name], adapter_name="default", torch_device="cpu")
        assert_rel(_logits(model), _logits(load(adapters[name])), 1e-6, name)


@pytest.mark.gpu
def test_gpu_inductor_triton_model_swaps_without_recompiling(adapters):
    """On a GPU: the Triton kernels inside an Inductor graph, four swaps (ranks and scales differ) without a
    recompilation; each equals the same adapter loaded into a fresh model (eager, same kernels) within 1e-5."""
    def load(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fastpeft.PeftModel.from_pretrained(_base().cuda(), path).eval()

    def logits(model):
        with torch.no_grad():
            return model(input_ids=IDS.cuda()).logits.float().cpu()

    model = load(adapters["a"])
    fastpeft.prepare_model_for_compiled_hotswap(model, target_rank=8)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    try:
        assert_rel(logits(compiled), logits(load(adapters["a"])), 1e-5, "a")
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("b", "wide", "narrow", "a"):
                fastpeft.hotswap_adapter(compiled, adapters[name], adapter_name="default", torch_device="cuda")
                assert_rel(logits(compiled), logits(load(adapters[name])), 1e-5, name)
    finally:
        torch._dynamo.reset()


def test_trainable_tokens_swap_same_rows_tied_or_not_and_refuse_other_rows(tmp_path):
    """Token rows swap with the adapter when both train the same rows (a tied head follows the embeddings' rows);
    other rows are refused before anything changes (the rows belong to the layers)."""
    for tie in (False, True):
        def base(tie=tie):
            torch.manual_seed(0)
            return tiny_llama(V, tie_word_embeddings=tie).eval()

        paths = {}
        for name, seed, rows in (("a", 1, [1, 2, 3]), ("b", 2, [1, 2, 3]), ("c", 3, [10, 20, 30])):
            torch.manual_seed(seed)
            model = fastpeft.get_peft_model(base(), fastpeft.LoraConfig(
                r=2, target_modules=QV, init_lora_weights=False, trainable_token_indices=rows))
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn_like(p) * 0.1)
            paths[name] = tmp_path / f"{name}{tie}"
            model.save_pretrained(paths[name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = fastpeft.PeftModel.from_pretrained(base(), paths["a"]).eval()
        fastpeft.hotswap_adapter(model, paths["b"], adapter_name="default", torch_device="cpu")
        assert_rel(_logits(model), _peft_logits(paths["b"], base()), 1e-6, f"tie={tie}")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="other token rows"):
            fastpeft.hotswap_adapter(model, paths["c"], adapter_name="default", torch_device="cpu")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_target_parameters_patterns_name_the_parameter(tmp_path):
    """rank_pattern / alpha_pattern keyed by the expert parameter's name give its scale, as at injection."""
    base = _moe_base
    paths = {}
    for name, seed in (("x", 1), ("y", 2)):
        torch.manual_seed(seed)
        model = fastpeft.get_peft_model(base(), fastpeft.LoraConfig(
            r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            alpha_pattern={"down_proj": 16}, rank_pattern={"gate_up_proj": 3}))
        paths[name] = tmp_path / name
        model.save_pretrained(paths[name])
    for prepare in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = fastpeft.PeftModel.from_pretrained(base(), paths["x"]).eval()
        if prepare:
            fastpeft.prepare_model_for_compiled_hotswap(model)
        fastpeft.hotswap_adapter(model, paths["y"], adapter_name="default", torch_device="cpu")
        assert_rel(_logits(model), _peft_logits(paths["y"], base()), 1e-6, f"prepared={prepare}")


def test_an_adapter_added_again_after_the_preparation_swaps_right(adapters):
    """The fold uses the scale the layer computes with, not the one recorded at preparation."""
    model = _load(adapters["a"])
    fastpeft.prepare_model_for_compiled_hotswap(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(adapters["wide"], adapter_name="tmp")
        model.delete_adapter("default")
        model.load_adapter(adapters["wide"], adapter_name="default")
    model.base_model.set_adapter("default")
    model.delete_adapter("tmp")
    fastpeft.hotswap_adapter(model, adapters["b"], adapter_name="default", torch_device="cpu")
    assert_rel(_logits(model), _peft_logits(adapters["b"]), 1e-6, "after re-adding")


def test_a_misshaped_magnitude_or_bias_changes_nothing(tmp_path):
    path = _save(tmp_path, "d", 1, r=2, lora_alpha=4, target_modules=QV, use_dora=True)
    model = _load(path)
    state = {k: v.clone() for k, v in model.state_dict().items() if ".default." in k}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith("lora_magnitude_vector.default.weight"))
    for bad in (state[key][:1], torch.cat([state[key], state[key][:1]])):
        with pytest.raises(ValueError, match="shape mismatch"):
            fastpeft.hotswap_adapter_from_state_dict(model, {**state, key: bad}, "default",
                                                     fastpeft.LoraConfig(r=2, lora_alpha=4, target_modules=QV,
                                                                         use_dora=True))
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tied_embedding_pair_folds_a_new_scale_once(tmp_path):
    """ensure_weight_tying: the tied head's factors are the embeddings' (shared memory). A swap after preparation
    with another alpha folds the new scale into that shared pair once (it was applied twice: the pair's product
    scaled by ratio², 75% off): the outputs equal a fresh load of the second adapter (peft cannot hot-swap a
    tied model; its fresh load is the reference)."""
    def tied():
        torch.manual_seed(0)
        return tiny_llama(V, tie_word_embeddings=True).eval()

    def save(name, seed, alpha):
        torch.manual_seed(seed)
        model = fastpeft.get_peft_model(tied(), fastpeft.LoraConfig(
            r=4, lora_alpha=alpha, target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True,
            init_lora_weights=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and "lora_" in n:
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(tmp_path / name)
        return tmp_path / name

    first, second = save("first", 1, 8), save("second", 2, 2)
    want = _peft_logits(second, tied())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastpeft.PeftModel.from_pretrained(tied(), first).eval()
    fastpeft.prepare_model_for_compiled_hotswap(model)
    fastpeft.hotswap_adapter(model, second, adapter_name="default")
    assert_rel(_logits(model), want, 1e-5, "swapped")
