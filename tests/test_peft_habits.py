"""peft users' habits that fastpeft must honour as peft 0.21.2 does, each compared against peft itself on tiny
models with identical weights: positional arguments (``save_pretrained(d, False)``, ``model(ids, mask, None,
labels)``), ``key_mapping`` when loading, ``save_embedding_layers`` after ``resize_token_embeddings``, nested
``disable_adapter()``, ``autocast_adapter_dtype`` on ``add_adapter`` / ``load_adapter``, trainable-token rows in
fp32 on half-precision bases, and the ``modules_to_save`` copies' ``requires_grad`` inside ``disable_adapter()``."""

from __future__ import annotations

import inspect
import os
import warnings

import pytest
import torch

import fastpeft
from helpers import task_factories, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V = 96
IDS = torch.tensor([[3, 7, 11, 5, 2, 9], [4, 4, 8, 1, 6, 2]])
MASK = torch.ones_like(IDS)


FACTORIES = task_factories(V)


def twin(task="CAUSAL_LM"):
    """Two base models of ``task`` with identical weights, in eval mode."""
    torch.manual_seed(0)
    a = FACTORIES[task]().eval()
    b = FACTORIES[task]().eval()
    b.load_state_dict(a.state_dict())
    return a, b


def both(config_of, task="CAUSAL_LM", **kwargs):
    """(fastpeft model, peft model) of the same base weights; ``config_of(lib)`` builds each library's config."""
    a, b = twin(task)
    torch.manual_seed(1)
    ours = fastpeft.get_peft_model(a, config_of(fastpeft), **kwargs)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(b, config_of(peft), **kwargs)
    return ours, theirs


def lora(lib, **kw):
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return lib.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kw)


def tensors(folder):
    from safetensors.torch import load_file

    path = os.path.join(folder, "adapter_model.safetensors")
    if os.path.isfile(path):
        return load_file(path)
    return torch.load(os.path.join(folder, "adapter_model.bin"), weights_only=True)


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# --------------------------------------------------------------------------- 1. positional arguments
def _params(fn):
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]


@pytest.mark.parametrize("method", ["save_pretrained", "push_to_hub"])
def test_save_and_push_parameters_in_peft_order(method):
    from fastpeft.methods.base import MethodPeftModel
    from fastpeft.methods.multi import MultiAdapterPeftModel
    from fastpeft.methods.prompt import PromptLearningPeftModel

    theirs = _params(getattr(peft.PeftModel, method))
    for cls in (fastpeft.PeftModel, PromptLearningPeftModel, MethodPeftModel, MultiAdapterPeftModel):
        assert _params(getattr(cls, method))[: len(theirs)] == theirs, cls


def test_save_pretrained_second_positional_is_safe_serialization(tmp_path):
    ours, theirs = both(lora)
    ours.save_pretrained(tmp_path / "ours", False)
    theirs.save_pretrained(tmp_path / "theirs", False)
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "theirs"))
    assert os.path.isfile(tmp_path / "ours" / "adapter_model.bin")
    assert_same_tensors(tensors(tmp_path / "ours"), tensors(tmp_path / "theirs"))


# positional calls per task class, in peft's parameter order
POSITIONAL = {
    "CAUSAL_LM": lambda: (IDS, MASK, None, IDS),
    "SEQ_CLS": lambda: (IDS, MASK, None, torch.tensor([0, 2])),
    "TOKEN_CLS": lambda: (IDS, MASK, None, IDS % 3),
    "QUESTION_ANS": lambda: (IDS, MASK, None, None, None, torch.tensor([1, 2]), torch.tensor([3, 4]), None, True),
    "FEATURE_EXTRACTION": lambda: (IDS, MASK, None, None, True),
    "SEQ_2_SEQ_LM": lambda: (IDS, MASK, None, IDS[:, :3].clone(), None, None, IDS[:, 1:4].clone()),
}


def _outputs(out):
    """The tensors of a model output (loss, logits, hidden states, ...), in order."""
    flat = []
    for value in out.values():
        if isinstance(value, torch.Tensor):
            flat.append(value)
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            flat.extend(value)
    return flat


@pytest.mark.parametrize("task", list(POSITIONAL))
def test_task_forward_maps_positionals_by_peft_name(task):
    targets = ["q", "v"] if task == "SEQ_2_SEQ_LM" else ["q_proj", "v_proj"]
    ours, theirs = both(lambda lib: lora(lib, target_modules=targets, task_type=task), task)
    assert type(ours).__name__ == type(theirs).__name__
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        a, b = ours(*POSITIONAL[task]()), theirs(*POSITIONAL[task]())
    assert list(a.keys()) == list(b.keys())
    ta, tb = _outputs(a), _outputs(b)
    assert len(ta) == len(tb) > 1
    for x, y in zip(ta, tb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["IA3", "PROMPT_TUNING"])
def test_method_task_forward_maps_positionals(method):
    def config(lib):
        if method == "IA3":
            return lib.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                 task_type="CAUSAL_LM")
        return lib.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")

    ours, theirs = both(config)
    args = (IDS, MASK, None, IDS, None, True)  # ..., labels, output_attentions, output_hidden_states
    with torch.no_grad():
        a, b = ours(*args), theirs(*args)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    assert len(a.hidden_states) == len(b.hidden_states) == 3


def test_positional_edge_cases_as_peft():
    ours, theirs = both(lambda lib: lora(lib, task_type="QUESTION_ANS"), "QUESTION_ANS")
    args = (IDS,) + (None,) * 11
    for model in (theirs, ours):
        with pytest.raises(TypeError, match="takes from 1 to 12 positional arguments but 13 were given"):
            model(*args)
        with pytest.raises(TypeError, match="multiple values for argument 'position_ids'"):
            model(IDS, MASK, None, None, position_ids=None)
    # without a task type, peft's PeftModel.forward(*args, **kwargs) hands positionals to the base model as they
    # are (LlamaForCausalLM's order: input_ids, attention_mask, position_ids, ...)
    ours, theirs = both(lora)
    pos = torch.arange(IDS.shape[1]).flip(0).expand_as(IDS)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS, MASK, pos).logits, theirs(IDS, MASK, pos).logits)


# --------------------------------------------------------------------------- 2. key_mapping
def _renamed_adapter(tmp_path, config_of):
    """An adapter trained-looking (random weights) saved by peft, its keys then renamed ``model.layers`` ->
    ``model.blocks`` (a checkpoint of another naming), with the source model's logits."""
    from safetensors.torch import load_file, save_file

    _, base = twin()
    torch.manual_seed(2)
    src = peft.get_peft_model(base, config_of(peft)).eval()
    with torch.no_grad():
        for p in src.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        ref = src(IDS).logits
    folder = tmp_path / "renamed"
    src.save_pretrained(folder)
    path = folder / "adapter_model.safetensors"
    save_file({k.replace("model.layers", "model.blocks"): v for k, v in load_file(path).items()}, path)
    return folder, ref


# the first matching pattern wins (peft's rule): the second entry would break every key
KEY_MAPPING = {r"model\.blocks": "model.layers", r"model": "broken"}


@pytest.mark.parametrize("method", ["LORA", "IA3"])
def test_key_mapping_remaps_saved_keys(tmp_path, method):
    def config(lib):
        if method == "IA3":
            return lib.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
        return lora(lib)

    folder, ref = _renamed_adapter(tmp_path, config)
    for lib in (peft, fastpeft):
        model = lib.PeftModel.from_pretrained(twin()[0], folder, key_mapping=KEY_MAPPING)
        with torch.no_grad():
            torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-6, msg=lib.__name__)
    if method == "LORA":
        for lib in (peft, fastpeft):
            model = lib.get_peft_model(twin()[0], lora(lib, target_modules=["k_proj"]))
            model.load_adapter(folder, "other", key_mapping=KEY_MAPPING)
            model.set_adapter("other")
            with torch.no_grad():
                torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-6, msg=lib.__name__)


def test_key_mapping_defaults_to_the_models_checkpoint_conversion_mapping(tmp_path):
    folder, ref = _renamed_adapter(tmp_path, lora)
    for lib in (peft, fastpeft):
        base = twin()[0]
        base._checkpoint_conversion_mapping = {r"model\.blocks": "model.layers"}
        model = lib.PeftModel.from_pretrained(base, folder)
        with torch.no_grad():
            torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-6, msg=lib.__name__)


# --------------------------------------------------------------------------- 3. save_embedding_layers
def _resized_pair(tmp_path, tie=False):
    """(fastpeft, peft) LoRA models on a saved base (so the adapter names a folder with its config.json) whose
    vocabulary was then resized by 4 tokens, embeddings not targeted."""
    base_dir = tmp_path / f"base{int(tie)}"
    if not base_dir.exists():
        torch.manual_seed(0)
        tiny_llama(V, tie_word_embeddings=tie).save_pretrained(base_dir)
    models = []
    for lib in (fastpeft, peft):
        base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
        torch.manual_seed(3)
        base.resize_token_embeddings(V + 4, mean_resizing=False)
        torch.manual_seed(1)
        models.append(lib.get_peft_model(base, lora(lib, target_modules=["q_proj"])))
    return base_dir, models


@pytest.mark.parametrize("tie", [False, True])
def test_save_embedding_layers_saves_resized_embeddings(tmp_path, tie):
    base_dir, (ours, theirs) = _resized_pair(tmp_path, tie)
    for selected in ("auto", True, False):
        out = {}
        for name, model in (("ours", ours), ("theirs", theirs)):
            folder = tmp_path / f"{name}-{selected}"
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                model.save_pretrained(folder, save_embedding_layers=selected)
            resized = [w for w in record if "`save_embedding_layers` to `True` as the embedding layer has been "
                       "resized during finetuning." in str(w.message)]
            assert len(resized) == (selected == "auto"), name
            out[name] = tensors(folder)
        assert_same_tensors(out["ours"], out["theirs"])
        extra = sorted(k for k in out["ours"] if "lora_" not in k)
        wanted = ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
        assert extra == ([] if selected is False else wanted)
    # the saved embeddings come back in either library, onto a base resized with other new rows
    with torch.no_grad():
        ref = ours(IDS + 4).logits
    for lib in (fastpeft, peft):
        base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
        torch.manual_seed(9)
        base.resize_token_embeddings(V + 4, mean_resizing=False)
        loaded = lib.PeftModel.from_pretrained(base, tmp_path / "ours-auto")
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS + 4).logits, ref, rtol=1e-5, atol=1e-6, msg=lib.__name__)


def test_save_embedding_layers_auto_leaves_an_unresized_vocabulary_out(tmp_path):
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    tiny_llama(V).save_pretrained(base_dir)
    for lib in (fastpeft, peft):
        base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
        torch.manual_seed(1)
        model = lib.get_peft_model(base, lora(lib, target_modules=["q_proj"]))
        model.save_pretrained(tmp_path / lib.__name__)
        assert all("lora_" in k for k in tensors(tmp_path / lib.__name__)), lib.__name__
        # True saves the embeddings whatever the vocabulary, as peft
        model.save_pretrained(tmp_path / f"{lib.__name__}-true", save_embedding_layers=True)
    assert_same_tensors(tensors(tmp_path / "fastpeft-true"), tensors(tmp_path / "peft-true"))
    assert "base_model.model.model.embed_tokens.weight" in tensors(tmp_path / "fastpeft-true")


# --------------------------------------------------------------------------- 4. nested disable_adapter()
def _perturbed(model):
    """``model`` with every trainable tensor moved off its init (so adapters and copies change the output)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


NESTED = {
    "LORA": lambda lib: lora(lib, modules_to_save=["lm_head"], trainable_token_indices=[1, 2]),
    "IA3": lambda lib: lib.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "PROMPT_TUNING": lambda lib: lib.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}


@pytest.mark.parametrize("method", list(NESTED))
def test_nested_disable_adapter_keeps_the_outer_block_off(method):
    ours, theirs = both(NESTED[method])
    with torch.no_grad():
        base = twin()[0](IDS).logits
    for model in (_perturbed(ours), _perturbed(theirs)):
        with torch.no_grad():
            on = model(IDS).logits
            with model.disable_adapter():
                with model.disable_adapter():
                    pass
                torch.testing.assert_close(model(IDS).logits, base, msg=type(model).__module__)
            torch.testing.assert_close(model(IDS).logits, on, msg=type(model).__module__)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["LORA", "IA3"])
def test_disable_adapter_leaves_layers_disabled_before_it_off(method):
    ours, theirs = both(NESTED[method])
    with torch.no_grad():
        base = twin()[0](IDS).logits
    for model in (_perturbed(ours), _perturbed(theirs)):
        model.base_model.disable_adapter_layers()
        with model.disable_adapter():
            pass
        with torch.no_grad():
            torch.testing.assert_close(model(IDS).logits, base, msg=type(model).__module__)
        model.base_model.enable_adapter_layers()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-6)


def test_disable_adapter_with_some_layers_off_warns_and_enables_all():
    ours, theirs = both(lora)
    for model in (_perturbed(ours), _perturbed(theirs)):
        model.base_model.model.model.layers[0].self_attn.q_proj.enable_adapters(False)
        with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
            with model.disable_adapter():
                pass
        assert all(not m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- 5. autocast_adapter_dtype
@pytest.mark.parametrize("method", ["add_adapter", "load_adapter", "from_pretrained"])
def test_adapter_loading_parameters_in_peft_order(method):
    from fastpeft.methods.base import MethodPeftModel
    from fastpeft.methods.multi import MultiAdapterPeftModel
    from fastpeft.methods.prompt import PromptLearningPeftModel

    theirs = _params(getattr(peft.PeftModel, method))
    classes = [fastpeft.PeftModel, MethodPeftModel, MultiAdapterPeftModel]
    if method != "add_adapter":
        classes.append(PromptLearningPeftModel)
    for cls in classes:
        assert _params(getattr(cls, method))[: len(theirs)] == theirs, cls


def _dtypes(model, adapter_name):
    return {n: p.dtype for n, p in model.named_parameters()
            if f".{adapter_name}." in n or n.endswith(f".{adapter_name}")}


@pytest.mark.parametrize("autocast", [True, False])
def test_add_and_load_adapter_take_autocast_adapter_dtype(tmp_path, autocast):
    src = peft.get_peft_model(twin()[0], lora(peft, target_modules=["q_proj"]))
    src.save_pretrained(tmp_path / "saved")
    found = {}
    for lib in (fastpeft, peft):
        model = lib.get_peft_model(twin()[0].to(torch.bfloat16), lora(lib, target_modules=["k_proj"]))
        model.add_adapter("added", lora(lib, target_modules=["v_proj"]), autocast_adapter_dtype=autocast)
        model.load_adapter(tmp_path / "saved", "loaded", autocast_adapter_dtype=autocast)
        found[lib.__name__] = (_dtypes(model, "added"), _dtypes(model, "loaded"),
                               {n: p.detach().clone() for n, p in model.named_parameters() if ".loaded." in n})
    ours, theirs = found["fastpeft"], found["peft"]
    assert ours[0] == theirs[0] and ours[1] == theirs[1]
    assert set(ours[0].values()) == {torch.float32 if autocast else torch.bfloat16}
    assert_same_tensors(ours[2], theirs[2])


# --------------------------------------------------------------------------- 6. trainable-token rows in fp32
TOKENS = {
    "lora": lambda lib: lora(lib, target_modules=["q_proj"], trainable_token_indices=[1, 2]),
    "standalone": lambda lib: lib.TrainableTokensConfig(token_indices=[1, 2]),
}


def _half_pair(config_of, dtype=torch.float16, **kwargs):
    a, b = twin()
    torch.manual_seed(1)
    ours = fastpeft.get_peft_model(a.to(dtype), config_of(fastpeft), **kwargs)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(b.to(dtype), config_of(peft), **kwargs)
    return ours, theirs


@pytest.mark.parametrize("kind", list(TOKENS))
def test_trainable_token_rows_are_fp32_on_a_half_base(tmp_path, kind):
    ours, theirs = _half_pair(TOKENS[kind])
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert {p.dtype for n, p in ours.named_parameters() if "trainable_tokens_delta" in n} == {torch.float32}
    for model in (ours, theirs):  # what Trainer(fp16=True) does: the scaler refuses fp16 gradients
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        scaler = torch.amp.GradScaler("cpu")
        out = model(input_ids=IDS, labels=IDS)
        assert out.logits.dtype == torch.float16
        scaler.scale(out.loss.float()).backward()
        scaler.unscale_(opt)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-2, atol=1e-3)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    # (the rows exactly; LoRA's A differs by peft's detour through fp16 at init, not the subject here)
    saved_ours, saved_theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert {k: v.dtype for k, v in saved_ours.items()} == {k: v.dtype for k, v in saved_theirs.items()}
    rows = [k for k in saved_ours if "trainable_tokens_delta" in k]
    assert rows and all(saved_ours[k].dtype == torch.float32 for k in rows)
    assert_same_tensors({k: saved_ours[k] for k in rows}, {k: saved_theirs[k] for k in rows})


def test_trainable_token_rows_keep_the_dtype_without_autocast():
    ours, theirs = _half_pair(TOKENS["lora"], dtype=torch.bfloat16, autocast_adapter_dtype=False)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert {p.dtype for n, p in ours.named_parameters() if "trainable_tokens_delta" in n} == {torch.bfloat16}
    for autocast in (True, False):  # add_adapter's own flag decides for the new adapter
        name = f"more{int(autocast)}"
        ours.add_adapter(name, TOKENS["lora"](fastpeft), autocast_adapter_dtype=autocast)
        theirs.add_adapter(name, TOKENS["lora"](peft), autocast_adapter_dtype=autocast)
        assert _dtypes(ours, name) == _dtypes(theirs, name)
        delta = f"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.{name}"
        assert _dtypes(ours, name)[delta] == (torch.float32 if autocast else torch.bfloat16)
    # a standalone trainable-tokens model takes it on add_adapter too
    ours, theirs = _half_pair(TOKENS["standalone"], dtype=torch.bfloat16)
    for model, lib in ((ours, fastpeft), (theirs, peft)):
        model.add_adapter("kept", lib.TrainableTokensConfig(token_indices=[3]), autocast_adapter_dtype=False)
        model.add_adapter("cast", lib.TrainableTokensConfig(token_indices=[4]))
    delta = "base_model.model.model.embed_tokens.trainable_tokens_delta."
    assert _dtypes(ours, "kept") == _dtypes(theirs, "kept") == {delta + "kept": torch.bfloat16}
    assert _dtypes(ours, "cast") == _dtypes(theirs, "cast") == {delta + "cast": torch.float32}


# --------------------------------------------------------------------------- 7. modules_to_save in disable_adapter()
def _copies_grad(model):
    return {n: p.requires_grad for n, p in model.named_parameters() if ".modules_to_save." in n}


@pytest.mark.parametrize("method", ["LORA", "IA3"])
def test_disable_adapter_freezes_modules_to_save_copies(method):
    def config(lib):
        if method == "IA3":
            return lib.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                 modules_to_save=["lm_head"])
        return lora(lib, modules_to_save=["lm_head"])

    ours, theirs = both(config)
    if method == "LORA":  # a second adapter with its own, inactive copy
        for model, lib in ((ours, fastpeft), (theirs, peft)):
            model.add_adapter("other", lora(lib, modules_to_save=["lm_head"]))
    before = _copies_grad(ours)
    assert before == _copies_grad(theirs) and any(before.values())
    for model in (ours, theirs):
        with model.disable_adapter():
            assert not any(_copies_grad(model).values()), type(model).__module__
        assert _copies_grad(model) == before, type(model).__module__


def test_modules_to_save_trainability_after_changes_inside_disable_adapter():
    ours, theirs = both(lambda lib: lora(lib, modules_to_save=["lm_head"]))
    seen = {}
    for model, lib in ((ours, fastpeft), (theirs, peft)):
        model.add_adapter("other", lora(lib, modules_to_save=["lm_head"]))
        with model.disable_adapter():
            assert not any(_copies_grad(model).values())
            model.set_adapter("other")  # as peft: the newly active copy trains (now and after the block)
            inside = _copies_grad(model)
        seen[lib.__name__] = (inside, _copies_grad(model))
    assert seen["fastpeft"] == seen["peft"]
    after = seen["fastpeft"][1]
    assert after["base_model.model.lm_head.modules_to_save.other.weight"]
    assert not after["base_model.model.lm_head.modules_to_save.default.weight"]


def test_disable_adapter_never_makes_a_frozen_copy_trainable(tmp_path):
    ours, _ = both(lambda lib: lora(lib, modules_to_save=["lm_head"]))
    ours.save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(twin()[0], tmp_path)  # is_trainable=False
    assert _copies_grad(loaded) and not any(_copies_grad(loaded).values())
    with loaded.disable_adapter():
        pass
    assert not any(_copies_grad(loaded).values())
    assert loaded.get_nb_trainable_parameters()[0] == 0
    # loaded for training, the copy is frozen inside the block only (as peft)
    for lib in (fastpeft, peft):
        trainable = lib.PeftModel.from_pretrained(twin()[0], tmp_path, is_trainable=True)
        with trainable.disable_adapter():
            assert not any(_copies_grad(trainable).values()), lib.__name__
        assert all(_copies_grad(trainable).values()), lib.__name__
