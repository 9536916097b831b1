"""peft 0.21.2 behaviours found missing by the session-12 bug hunts, each compared against peft itself: the
``auto_mapping`` field (written and read by ``AutoPeftModel`` for adapters without a task type), the base model's
name recorded by ``get_peft_model``, one-adapter methods saving a non-default adapter into its own folder, peft's
``LoraConfig`` object accepted, an adapter called ``"base_layer"`` on embeddings, ``generation_config`` assigned to a
causal-LM peft model, ``adapter_names`` refused by non-LoRA methods, and prompt learning for question answering and
feature extraction."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import fastpeft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V = 96
IDS = torch.tensor([[3, 7, 11, 5, 2, 9], [4, 4, 8, 1, 6, 2]])


def llama_config():
    return transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama_config()).save_pretrained(d)
    return str(d)


def load_base(path):
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("saver", ["peft", "fastpeft"])
def test_auto_peft_model_reads_and_writes_auto_mapping(base_dir, tmp_path, saver):
    lib = peft if saver == "peft" else fastpeft
    torch.manual_seed(0)
    m = lib.get_peft_model(load_base(base_dir), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(m)
    m.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                     "parent_library": "transformers.models.llama.modeling_llama"}
    ref = logits(m)
    for loader in (peft, fastpeft):  # both libraries load either file onto the causal LM, not a bare LlamaModel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = loader.AutoPeftModel.from_pretrained(str(tmp_path / "a"))
        assert type(loaded.get_base_model()).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=1e-6)


def test_auto_mapping_outside_the_allowlist_is_refused(base_dir, tmp_path):
    m = fastpeft.get_peft_model(load_base(base_dir), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    m.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    data = json.loads(path.read_text())
    data["auto_mapping"] = {"base_model_class": "X", "parent_library": "os"}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="import_allowlist"):
        fastpeft.AutoPeftModel.from_pretrained(str(tmp_path / "a"))


def test_get_peft_model_records_the_model_it_wraps(base_dir, tmp_path):
    other = tmp_path / "other"
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(llama_config()).save_pretrained(other)
    names = {}
    for lib in (peft, fastpeft):
        cfg = lib.LoraConfig(r=4, target_modules=["q_proj"], base_model_name_or_path=base_dir)
        with pytest.warns(UserWarning, match="was renamed from"):
            m = lib.get_peft_model(load_base(str(other)), cfg)
        names[lib] = m.peft_config["default"].base_model_name_or_path
    assert names[fastpeft] == names[peft] == str(other)


@pytest.mark.parametrize("kind", ["prompt", "prefix", "adalora"])
def test_one_adapter_methods_save_a_named_adapter_in_its_folder(base_dir, tmp_path, kind):
    def config(lib):
        return {"prompt": lambda: lib.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
                "prefix": lambda: lib.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
                "adalora": lambda: lib.AdaLoraConfig(r=4, init_r=4, target_r=2, total_step=10,
                                                     target_modules=["q_proj"], task_type="CAUSAL_LM")}[kind]()

    trees = {}
    for lib in (peft, fastpeft):
        torch.manual_seed(0)
        m = lib.get_peft_model(load_base(base_dir), config(lib), adapter_name="my")
        d = tmp_path / lib.__name__
        m.save_pretrained(d)
        trees[lib] = sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs
                            if not f.endswith(".md"))
        with pytest.raises(ValueError):
            m.save_pretrained(tmp_path / f"{lib.__name__}_sel", selected_adapters=["nope"])
    assert trees[fastpeft] == trees[peft] == ["my/adapter_config.json", "my/adapter_model.safetensors"]
    fastpeft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "peft" / "my", adapter_name="my")


def test_peft_lora_config_objects_are_accepted(base_dir, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(**{k: getattr(cfg, k) for k in
                                                                           ("r", "lora_alpha", "init_lora_weights",
                                                                            "target_modules")}))
    ours = fastpeft.get_peft_model(load_base(base_dir), cfg)
    assert isinstance(ours.peft_config["default"], fastpeft.LoraConfig)
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)
    theirs.save_pretrained(tmp_path / "a")
    loaded = fastpeft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "a",
                                                config=peft.LoraConfig.from_pretrained(tmp_path / "a"))
    torch.testing.assert_close(logits(loaded), logits(theirs), rtol=0, atol=1e-6)
    ours.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "second" in ours.peft_config


def test_adapter_called_base_layer_on_embeddings_round_trips(base_dir, tmp_path):
    kw = dict(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    for saver in (peft, fastpeft):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = saver.get_peft_model(load_base(base_dir), saver.LoraConfig(**kw), adapter_name="base_layer")
            m.save_pretrained(tmp_path / saver.__name__, save_embedding_layers=True)
            ref = logits(m)
            for loader in (peft, fastpeft):
                lm = loader.PeftModel.from_pretrained(load_base(base_dir), tmp_path / saver.__name__ / "base_layer",
                                                      adapter_name="base_layer")
                torch.testing.assert_close(logits(lm), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_generation_config_assigned_to_a_causal_lm_peft_model_is_used(base_dir, method):
    config = {"lora": lambda: fastpeft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
              "ia3": lambda: fastpeft.IA3Config(target_modules=["q_proj", "down_proj"],
                                                feedforward_modules=["down_proj"], task_type="CAUSAL_LM"),
              "prompt": lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")}[method]()
    m = fastpeft.get_peft_model(load_base(base_dir), config).eval()
    m.generation_config = transformers.GenerationConfig(max_new_tokens=3, do_sample=False)
    out = m.generate(input_ids=IDS[:1], attention_mask=torch.ones_like(IDS[:1]))
    assert out.shape[1] == IDS.shape[1] + 3  # peft: 3 for LoRA and IA3 (its prompt-learning path drops it)


@pytest.mark.parametrize("method", ["ia3", "adalora"])
def test_adapter_names_refused_by_non_lora_methods(base_dir, method):
    config = {"ia3": lambda: fastpeft.IA3Config(target_modules=["q_proj", "down_proj"],
                                                feedforward_modules=["down_proj"], task_type="CAUSAL_LM"),
              "adalora": lambda: fastpeft.AdaLoraConfig(r=4, init_r=4, target_r=2, total_step=10,
                                                        target_modules=["q_proj"], task_type="CAUSAL_LM")}[method]()
    m = fastpeft.get_peft_model(load_base(base_dir), config).eval()
    with pytest.raises(TypeError, match="LoRA adapters only"):  # peft's AdaLoRA: TypeError; its IA3 ignores them
        m(input_ids=IDS, adapter_names=["default", "__base__"])
    with pytest.raises(TypeError, match="LoRA adapters only"):
        m.generate(input_ids=IDS, adapter_names=["default", "__base__"], max_new_tokens=2)
    m(input_ids=IDS, adapter_names=None)  # None is no request


@pytest.mark.parametrize("task", ["QUESTION_ANS", "FEATURE_EXTRACTION"])
@pytest.mark.parametrize("kind", ["prompt", "ptuning", "prefix"])
def test_prompt_learning_for_qa_and_feature_extraction_matches_peft(task, kind):
    if kind == "prefix" and task == "QUESTION_ANS":
        with pytest.raises(ValueError, match="QUESTION_ANS"):  # peft fails here too
            fastpeft.get_peft_model(_bert(task), fastpeft.PrefixTuningConfig(num_virtual_tokens=3, task_type=task))
        return
    outs = {}
    for lib in (peft, fastpeft):
        extra = {"encoder_hidden_size": 16} if kind == "ptuning" else {}
        cls = {"prompt": "PromptTuningConfig", "ptuning": "PromptEncoderConfig", "prefix": "PrefixTuningConfig"}[kind]
        cfg = getattr(lib, cls)(num_virtual_tokens=3, task_type=task, **extra)
        torch.manual_seed(1)
        m = lib.get_peft_model(_bert(task), cfg).eval()
        with torch.no_grad():
            outs[lib] = m(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    keys = ("start_logits", "end_logits") if task == "QUESTION_ANS" else ("last_hidden_state",)
    for k in keys:
        torch.testing.assert_close(outs[fastpeft][k], outs[peft][k], rtol=0, atol=1e-5)


def test_prompt_tuning_qa_loss_counts_positions_past_the_virtual_tokens():
    """The answer span of a QA batch moves with its tokens (peft leaves the positions where they were, so its loss
    points into the virtual tokens): fastpeft's loss equals the base head's loss on the shifted logits."""
    torch.manual_seed(1)
    m = fastpeft.get_peft_model(_bert("QUESTION_ANS"), fastpeft.PromptTuningConfig(num_virtual_tokens=3,
                                                                                  task_type="QUESTION_ANS")).eval()
    start, end = torch.tensor([1, 2]), torch.tensor([3, 4])
    with torch.no_grad():
        out = m(input_ids=IDS, attention_mask=torch.ones_like(IDS), start_positions=start, end_positions=end)
    ce = torch.nn.functional.cross_entropy
    want = (ce(out.start_logits, start + 3) + ce(out.end_logits, end + 3)) / 2
    torch.testing.assert_close(out.loss, want)


def _bert(task):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    cls = transformers.BertForQuestionAnswering if task == "QUESTION_ANS" else transformers.BertModel
    return cls(cfg).eval()


def test_merge_adapter_unties_a_tied_token_pair_only_while_merged():
    """Different trainable token ids on the halves of a tied pair: merge_adapter gives the head its own copy (so
    the merged model computes the adapter model), unmerge_adapter ties them again (no lasting extra copy)."""
    torch.manual_seed(0)
    cfg = llama_config()
    cfg.tie_word_embeddings = True
    m = fastpeft.get_peft_model(transformers.LlamaForCausalLM(cfg), fastpeft.LoraConfig(
        r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [3, 4]}))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "trainable_tokens_delta" in n:
                p.normal_()
    m.eval()
    ref = logits(m)

    def weight(module):
        module = getattr(module, "token_adapter", module)
        return getattr(module, "base_layer", module).weight

    base = m.get_base_model()
    assert weight(base.get_input_embeddings()) is weight(base.get_output_embeddings())
    with pytest.warns(UserWarning, match="unmerge_adapter ties them again"):
        m.merge_adapter()
    torch.testing.assert_close(logits(m), ref, rtol=0, atol=1e-5)
    m.unmerge_adapter()
    assert weight(base.get_input_embeddings()) is weight(base.get_output_embeddings())
    assert base.config.tie_word_embeddings
    torch.testing.assert_close(logits(m), ref, rtol=0, atol=1e-5)


def test_prompt_learning_refuses_adapter_names(base_dir):
    m = fastpeft.get_peft_model(load_base(base_dir), fastpeft.PromptTuningConfig(num_virtual_tokens=2,
                                                                                 task_type="CAUSAL_LM")).eval()
    with pytest.raises(TypeError, match="LoRA adapters only"):
        m(input_ids=IDS, adapter_names=["default", "__base__"])
    with pytest.raises(TypeError, match="LoRA adapters only"):
        m.generate(input_ids=IDS, adapter_names=["default", "__base__"], max_new_tokens=2)


# ----------------------------------------------------------------------------- the non-LoRA methods (hunt I)
ADALORA = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], init_r=6, target_r=2,
               total_step=12)


@pytest.mark.parametrize("init", [True, False])
def test_adalora_and_ia3_draw_peft_random_numbers(base_dir, init):
    """A seed gives peft's AdaLoRA factors (its draws include one for ranknum) and leaves the random stream where
    peft leaves it (IA3 too: peft draws its vectors before setting them to ones)."""
    made = {}
    for lib in (peft, fastpeft):
        torch.manual_seed(0)
        m = lib.get_peft_model(load_base(base_dir), lib.AdaLoraConfig(init_lora_weights=init, **ADALORA))
        made[lib] = ({k: v for k, v in m.state_dict().items() if "lora_" in k}, torch.rand(1))
        torch.manual_seed(0)
        lib.get_peft_model(load_base(base_dir), lib.IA3Config(target_modules=["q_proj", "down_proj"],
                                                              feedforward_modules=["down_proj"]))
        made[lib] += (torch.rand(1),)
    (ours, ours_next, ours_ia3), (theirs, theirs_next, theirs_ia3) = made[fastpeft], made[peft]
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    assert ours_next == theirs_next and ours_ia3 == theirs_ia3


def test_adalora_config_with_a_rank_pattern_starts_at_init_r(base_dir):
    """A config carrying a finished run's rank_pattern builds full init_r layers (peft resizes only when it loads
    a saved adapter), so the budget schedule has something to prune and the next save loads in peft."""
    pattern = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, False, False, False, False]}
    shapes = {}
    for lib in (peft, fastpeft):
        torch.manual_seed(0)
        m = lib.get_peft_model(load_base(base_dir), lib.AdaLoraConfig(rank_pattern=pattern, **ADALORA))
        shapes[lib] = {k: tuple(v.shape) for k, v in m.state_dict().items() if "lora_E" in k}
    assert shapes[fastpeft] == shapes[peft] and set(shapes[peft].values()) == {(6, 1)}


def test_adalora_on_bf16_rounds_once_as_peft(base_dir):
    models = {}
    for lib in (peft, fastpeft):
        torch.manual_seed(0)
        models[lib] = lib.get_peft_model(load_base(base_dir).to(torch.bfloat16), lib.AdaLoraConfig(**ADALORA)).eval()
    with torch.no_grad():
        for (_, p), (_, q) in zip(sorted(models[fastpeft].named_parameters()), sorted(models[peft].named_parameters())):
            p.copy_(q + (0.05 * torch.randn_like(q) if p.requires_grad else 0))
            q.copy_(p)
    torch.testing.assert_close(logits(models[fastpeft]), logits(models[peft]), rtol=0, atol=0)


def test_adalora_warns_that_r_is_unused():
    with pytest.warns(UserWarning, match="`r` is not used in AdaLora"):
        fastpeft.AdaLoraConfig(r=16, total_step=10)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_gradient_on_a_bf16_base_is_summed_in_fp32_as_peft(base_dir, projection):
    grads = {}
    ids = torch.randint(0, V, (16, 6), generator=torch.Generator().manual_seed(3))
    for lib in (peft, fastpeft):
        torch.manual_seed(0)
        m = lib.get_peft_model(load_base(base_dir).to(torch.bfloat16), lib.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=32))
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        grads[lib] = m.prompt_encoder["default"].embedding.weight.grad
    tol = 0 if not projection else 1e-6
    torch.testing.assert_close(grads[fastpeft], grads[peft], rtol=tol, atol=tol * float(grads[peft].abs().max()))


# ----------------------------------------------------------------------------- several adapters (hunt H)
def _two_adapters(lib, base_dir, dtype=torch.float32, autocast=True):
    torch.manual_seed(0)
    m = lib.get_peft_model(load_base(base_dir).to(dtype), lib.LoraConfig(r=4, target_modules=["q_proj"],
                                                                        init_lora_weights=False),
                           autocast_adapter_dtype=autocast)
    m.add_adapter("b", lib.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False),
                  autocast_adapter_dtype=autocast)
    return m.eval()


def test_empty_adapter_names_merge_nothing_as_peft(base_dir):
    plain = logits(load_base(base_dir))
    for lib in (peft, fastpeft):
        m = _two_adapters(lib, base_dir)
        m.merge_adapter(adapter_names=[])
        assert not any(getattr(layer, "merged_adapters", []) for layer in m.modules())
        merged = m.merge_and_unload(adapter_names=[])
        torch.testing.assert_close(logits(merged), plain, rtol=0, atol=0)


@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_weighted_adapter_of_half_precision_adapters_keeps_their_dtype(base_dir, combination):
    dtypes = {}
    for lib in (peft, fastpeft):
        m = _two_adapters(lib, base_dir, torch.bfloat16, autocast=False)
        m.add_adapter("c", lib.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                      autocast_adapter_dtype=False)
        m.add_weighted_adapter(["default", "c"], [0.5, 0.5], "mix", combination_type=combination)
        dtypes[lib] = {p.dtype for n, p in m.named_parameters() if ".mix." in n}
    assert dtypes[fastpeft] == dtypes[peft] == {torch.bfloat16}


def test_model_status_with_adapters_on_different_modules(base_dir):
    status = {}
    for lib in (peft, fastpeft):
        m = _two_adapters(lib, base_dir)
        m.base_model.set_adapter(["default", "b"])  # (peft's PeftModel.set_adapter takes one name)
        both = m.get_model_status().active_adapters
        m.base_model.set_adapter("b")
        status[lib] = (both, m.get_model_status().active_adapters)
    assert status[fastpeft] == status[peft] == (["default", "b"], ["b"])


# ----------------------------------------------------------------------------- to_peft (hunt G)
def test_to_peft_refuses_merged_and_non_lora_models_before_changing_them(base_dir):
    m = _two_adapters(fastpeft, base_dir)
    m.merge_adapter()
    before = logits(m)
    with pytest.raises(ValueError, match="merged"):
        fastpeft.to_peft(m)
    torch.testing.assert_close(logits(m), before, rtol=0, atol=0)
    ia3 = fastpeft.get_peft_model(load_base(base_dir), fastpeft.IA3Config(target_modules=["q_proj", "down_proj"],
                                                                          feedforward_modules=["down_proj"]))
    before = logits(ia3)
    with pytest.raises(ValueError, match="converts LoRA models"):
        fastpeft.to_peft(ia3)
    torch.testing.assert_close(logits(ia3), before, rtol=0, atol=0)


def test_to_peft_keeps_active_list_trainability_mode_and_disabled_adapters(base_dir, tmp_path):
    m = _two_adapters(fastpeft, base_dir)
    m.base_model.set_adapter(["default", "b"])
    want = logits(m)
    out = fastpeft.to_peft(m)
    assert type(out).__module__.startswith("peft") and out.active_adapters == ["default", "b"]
    torch.testing.assert_close(logits(out), want, rtol=0, atol=1e-6)

    src = _two_adapters(peft, base_dir)
    src.save_pretrained(tmp_path / "a")
    loaded = fastpeft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "a")  # inference: frozen, eval
    out = fastpeft.to_peft(loaded)
    assert not out.training and not any(p.requires_grad for n, p in out.named_parameters() if "lora_" in n)

    m = _two_adapters(fastpeft, base_dir)
    m.base_model.disable_adapter_layers()
    out = fastpeft.to_peft(m)
    torch.testing.assert_close(logits(out), logits(load_base(base_dir)), rtol=0, atol=1e-6)


def test_merge_warnings_use_peft_words(base_dir):
    for lib in (peft, fastpeft):
        m = _two_adapters(lib, base_dir)
        with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
            m.unmerge_adapter()
        m.merge_adapter()
        with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do."):
            m.merge_adapter()


# ----------------------------------------------------------------------------- several adapters (hunt K)
def test_modules_to_save_on_another_adapters_lora_layer_is_refused_and_leaves_nothing(base_dir):
    for lib in (peft, fastpeft):
        m = lib.get_peft_model(load_base(base_dir), lib.LoraConfig(r=2, target_modules=["lm_head"]),
                               adapter_name="first")
        with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type"):
            m.add_adapter("second", lib.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]))
    assert list(m.peft_config) == ["first"]
    assert not any(".second." in n for n, _ in m.named_parameters())


def test_trainable_token_rows_are_frozen_inside_disable_adapter(base_dir):
    for lib in (peft, fastpeft):
        m = lib.get_peft_model(load_base(base_dir), lib.LoraConfig(r=2, target_modules=["q_proj"],
                                                                  trainable_token_indices=[1, 5]))
        before = sorted(n for n, p in m.named_parameters() if p.requires_grad)
        with m.disable_adapter():
            assert not any(p.requires_grad for p in m.parameters())
        assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == before


def test_deleting_the_active_adapter_and_prefix_names_warn_as_peft(base_dir):
    for lib in (peft, fastpeft):
        with pytest.warns(UserWarning, match="should not be contained in the prefix 'lora_'"):
            m = lib.get_peft_model(load_base(base_dir), lib.LoraConfig(r=2, target_modules=["q_proj"]),
                                   adapter_name="lo")
        with pytest.warns(UserWarning, match="should not be contained in the prefix 'lora_'"):
            m.add_adapter("a", lib.LoraConfig(r=2, target_modules=["q_proj"]))
        with pytest.warns(UserWarning, match="Adapter lo was active which is now deleted. Setting active adapter to a"):
            m.delete_adapter("lo")
        assert m.active_adapters == ["a"]


def test_status_of_a_from_peft_model_is_peft_own(base_dir):
    theirs = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    want = peft.get_model_status(theirs)
    converted = fastpeft.from_peft(theirs)
    got = fastpeft.get_model_status(converted)
    assert (got.base_model_type, got.adapter_model_type, got.num_adapter_layers, got.active_adapters) == \
        (want.base_model_type, want.adapter_model_type, want.num_adapter_layers, want.active_adapters)
    assert [s.name for s in fastpeft.get_layer_status(converted)] == [s.name for s in peft.get_layer_status(theirs)]


def test_pruned_adalora_adapter_loads_into_a_model_built_at_init_r(base_dir, tmp_path):
    """A finished AdaLoRA run's adapter (pruned ranks) loaded with load_adapter into get_peft_model(saved config)
    — the resume pattern, and transformers' Trainer's — takes the saved sizes as peft's loader does, and gives the
    trained model's outputs (and peft's load of the same folder)."""
    torch.manual_seed(0)
    cfg = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_r=6, target_r=2, total_step=6,
               tinit=1, tfinal=1, deltaT=1)
    m = fastpeft.get_peft_model(load_base(base_dir), fastpeft.AdaLoraConfig(**cfg))
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for step in range(6):
        m(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        m.base_model.update_and_allocate(step)
        opt.zero_grad()
    m.save_pretrained(tmp_path / "a")
    m.eval()
    want = logits(m)
    assert any(not all(v) for v in fastpeft.AdaLoraConfig.from_pretrained(tmp_path / "a").rank_pattern.values())
    for lib in (peft, fastpeft):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = lib.get_peft_model(load_base(base_dir), lib.AdaLoraConfig.from_pretrained(tmp_path / "a"))
            fresh.load_adapter(tmp_path / "a", "default")
        torch.testing.assert_close(logits(fresh.eval()), want, rtol=0, atol=1e-5)
