"""``add_weighted_adapter`` against Hugging Face peft: the same adapters (same weights) combined with the same
arguments give the same new adapter (factors, or for the SVD types the update B·A·scale, whose factors are
fixed only up to sign), the same config, the same logits once it is active; and the same refusals.

The DARE types draw random masks with ``torch.bernoulli``. Most comparisons give both libraries their draws
from one freshly seeded generator (``torch.bernoulli`` replaced for the call): their masks are then the same
if they draw the same masks in the same order, which the comparison checks. One test seeds torch's global
generator alone, as a user would.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fastpeft
from fastpeft.merging import combine, keep_random
from helpers import assert_rel

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V = 64
INPUTS = {"input_ids": torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(3))}

# a, b: same rank, different targets (so some modules hold only one of them); c: another rank.
LLAMA_ADAPTERS = {
    "x": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "y": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
    "z": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
}


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg)


def _pair(adapters=None, factory=_llama, **common):
    """(fastpeft model, peft model): identical base weights, identical adapters with random non-zero B."""
    adapters = LLAMA_ADAPTERS if adapters is None else adapters
    torch.manual_seed(0)
    base_a = factory().eval()
    base_b = factory().eval()
    base_b.load_state_dict(base_a.state_dict())
    ours = theirs = None
    torch.manual_seed(1)
    for name, kw in adapters.items():
        kw = dict(init_lora_weights=False, **common, **kw)
        if ours is None:
            ours = fastpeft.get_peft_model(base_a, fastpeft.LoraConfig(**kw), adapter_name=name)
            theirs = peft.get_peft_model(base_b, peft.LoraConfig(**kw), adapter_name=name)
        else:
            ours.add_adapter(name, fastpeft.LoraConfig(**kw))
            theirs.add_adapter(name, peft.LoraConfig(**kw))
    with torch.no_grad():  # make modules_to_save copies differ from the original modules
        for n, p in ours.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p))
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k or "modules_to_save" in k]
    return ours.eval(), theirs.eval()


def _layers(model, name):
    """{module path: (A, B, scaling)} of adapter ``name``."""
    out = {}
    for path, m in model.base_model.model.named_modules():
        if hasattr(m, "lora_A") and not isinstance(m.lora_A, dict) and name in m.lora_A:
            out[path] = (m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach(), m.scaling[name])
    return out


def _logits(model, adapter):
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(**INPUTS).logits


@pytest.fixture
def same_draws(monkeypatch):
    """``reset()`` before each library's call: their torch.bernoulli draws then come from the same stream."""
    real = torch.bernoulli
    state = {"gen": None, "calls": 0}

    def bernoulli(p, *args, **kwargs):
        state["calls"] += 1
        return real(p, generator=state["gen"])

    def reset():
        state["gen"] = torch.Generator().manual_seed(1234)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    reset()
    state["reset"] = reset
    return state


def _add_both(ours, theirs, same_draws, *args, **kwargs):
    for model in (ours, theirs):
        same_draws["reset"]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(*args, **kwargs)


def _assert_same_new_adapter(ours, theirs, name, exact_factors):
    la, lb = _layers(ours, name), _layers(theirs, name)
    assert la and sorted(la) == sorted(lb), sorted(set(la) ^ set(lb))
    for path, (A, B, s) in la.items():
        A2, B2, s2 = lb[path]
        assert s == pytest.approx(s2), path
        if exact_factors:
            torch.testing.assert_close(A, A2, rtol=1e-5, atol=1e-6, msg=f"lora_A of {path}")
            torch.testing.assert_close(B, B2, rtol=1e-5, atol=1e-6, msg=f"lora_B of {path}")
        # the update itself (for the SVD types the factors are fixed only up to the signs of the pairs)
        assert_rel(B @ A * s, B2 @ A2 * s2, 1e-5, f"update of {path}")
        assert (B @ A).abs().max() > 1e-3, f"{path}: the new adapter is zero; the comparison proves nothing"
    for field in ("r", "lora_alpha"):
        assert getattr(ours.peft_config[name], field) == getattr(theirs.peft_config[name], field), field
    ta, tb = ours.peft_config[name].target_modules, theirs.peft_config[name].target_modules
    assert (ta == tb) if isinstance(tb, str) else (set(ta) == set(tb)), (ta, tb)
    # not activated, not trainable, as in peft
    assert ours.active_adapter == theirs.active_adapter != name
    assert not any(p.requires_grad for n, p in ours.named_parameters() if f".{name}." in n)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert_rel(_logits(ours, name), _logits(theirs, name), 1e-5, f"logits with {name!r} active")


# combination type -> (adapters, weights, extra arguments)
TWO_SAME_RANK = (["x", "y"], [0.7, -0.4])
THREE = (["x", "y", "z"], [0.7, -0.4, 1.3])
CASES = {
    "svd": (*THREE, {}),
    "svd_rank3_clamp": (*THREE, dict(combination_type="svd", svd_rank=3, svd_clamp=0.9)),
    "svd_reduced": (*THREE, dict(combination_type="svd", svd_full_matrices=False)),
    "cat": (*THREE, dict(combination_type="cat")),
    "linear": (*TWO_SAME_RANK, dict(combination_type="linear")),
    "ties": (*TWO_SAME_RANK, dict(combination_type="ties", density=0.6)),
    "ties_frequency": (*TWO_SAME_RANK, dict(combination_type="ties", density=0.5, majority_sign_method="frequency")),
    "ties_svd": (*THREE, dict(combination_type="ties_svd", density=0.6)),
    "dare_linear": (*TWO_SAME_RANK, dict(combination_type="dare_linear", density=0.6)),
    "dare_ties": (*TWO_SAME_RANK, dict(combination_type="dare_ties", density=0.5)),
    "dare_linear_svd": (*THREE, dict(combination_type="dare_linear_svd", density=0.7)),
    "dare_ties_svd": (*THREE, dict(combination_type="dare_ties_svd", density=0.6, majority_sign_method="frequency")),
    "magnitude_prune": (*TWO_SAME_RANK, dict(combination_type="magnitude_prune", density=0.4)),
    "magnitude_prune_svd": (*THREE, dict(combination_type="magnitude_prune_svd", density=0.4)),
}



def _saved_configs(ours, theirs, tmp_path, name: str) -> tuple[dict, dict]:
    """The adapter_config.json fastpeft and peft write for adapter ``name`` (saved alone)."""
    ours.save_pretrained(tmp_path, selected_adapters=[name])
    theirs.save_pretrained(tmp_path / "peft", selected_adapters=[name])
    return (json.loads((tmp_path / name / "adapter_config.json").read_text()),
            json.loads((tmp_path / "peft" / name / "adapter_config.json").read_text()))


@pytest.mark.parametrize("case", list(CASES))
def test_new_adapter_equals_peft(case, same_draws):
    adapters, weights, kwargs = CASES[case]
    ours, theirs = _pair()
    calls_before = same_draws["calls"]
    _add_both(ours, theirs, same_draws, adapters, weights, "new", **kwargs)
    if "dare" in kwargs.get("combination_type", ""):
        assert same_draws["calls"] > calls_before, "DARE drew no random masks"
    _assert_same_new_adapter(ours, theirs, "new", exact_factors=not kwargs.get("combination_type", "svd")
                             .endswith("svd"))


@pytest.mark.parametrize("combination_type", ["svd", "ties", "dare_ties_svd", "cat"])
def test_fan_in_fan_out_layers_equal_peft(combination_type, same_draws):
    # GPT-2's Conv1D stores its weight (in, out): the updates, masks and factors must use the right layout
    # (c_proj: (32, 32) and (32, 128) updates; MKL's SVD of a tall one such as c_attn's takes 0.4 s on CPU)
    adapters = {"x": dict(r=4, lora_alpha=8, target_modules=["c_proj"]),
                "y": dict(r=4, lora_alpha=4, target_modules=["c_proj"], layers_to_transform=[1])}
    ours, theirs = _pair(adapters, factory=_gpt2, fan_in_fan_out=True)
    _add_both(ours, theirs, same_draws, ["x", "y"], [1.0, 0.5], "new", combination_type=combination_type,
              density=0.5)
    _assert_same_new_adapter(ours, theirs, "new", exact_factors=not combination_type.endswith("svd"))


def test_single_adapter_is_always_linear_like_peft(same_draws):
    ours, theirs = _pair()
    _add_both(ours, theirs, same_draws, ["z"], [2.0], "new", combination_type="svd", svd_rank=1)
    assert ours.peft_config["new"].r == 2  # linear: the adapter's rank, svd_rank ignored (as in peft)
    _assert_same_new_adapter(ours, theirs, "new", exact_factors=True)


def test_cat_and_full_rank_svd_are_exact():
    # independent of peft: "cat" is exactly Σ w_i · update_i, and so is "svd" at a rank that holds it
    ours, _ = _pair()
    weights = {"x": 0.7, "y": -0.4, "z": 1.3}
    ours.add_weighted_adapter(list(weights), list(weights.values()), "cat", combination_type="cat")
    ours.add_weighted_adapter(list(weights), list(weights.values()), "svd", svd_rank=10)
    for name in ("cat", "svd"):
        for path, (A, B, s) in _layers(ours, name).items():
            expected = sum(w * (Bi @ Ai * si) for a, w in weights.items()
                           for Ai, Bi, si in [_layers(ours, a).get(path, (None,) * 3)] if Ai is not None)
            assert_rel(B @ A * s, expected, 1e-5, f"{name} {path}")
    assert ours.peft_config["cat"].r == 10 and ours.peft_config["svd"].r == 10


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_dare_with_one_seed_equals_peft(init):
    # no replaced torch.bernoulli here: the new adapter's initialization consumes the global generator as in
    # peft, so seeding both the same gives peft's masks
    ours, theirs = _pair()
    for model in (ours, theirs):
        model.peft_config["x"].init_lora_weights = init
        torch.manual_seed(5)
        model.add_weighted_adapter(["x", "y", "z"], [0.7, -0.4, 1.3], "new", combination_type="dare_ties_svd",
                                   density=0.5)
    _assert_same_new_adapter(ours, theirs, "new", exact_factors=False)


def test_dare_draws_from_torch_generator_with_the_expected_statistics():
    t = torch.ones(200_000)
    torch.manual_seed(0)
    kept = keep_random(t, 0.3)
    assert abs((kept != 0).float().mean().item() - 0.3) < 0.005  # each entry kept with probability density
    assert torch.allclose(kept[kept != 0], torch.tensor(1 / 0.3))  # and rescaled by 1/density
    assert abs(kept.mean().item() - 1.0) < 0.02  # the expectation is kept
    # through the model: the same seed gives the same adapter, another seed another one
    ours, _ = _pair()
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        torch.manual_seed(seed)
        ours.add_weighted_adapter(["x", "y"], [1.0, 1.0], name, combination_type="dare_linear", density=0.5)
    l0, l0b, l1 = (_layers(ours, n) for n in ("s0", "s0_again", "s1"))
    assert all(torch.equal(l0[k][0], l0b[k][0]) and torch.equal(l0[k][1], l0b[k][1]) for k in l0)
    assert any(not torch.equal(l0[k][0], l1[k][0]) for k in l0)


def test_ties_rule_by_hand():
    t1 = torch.tensor([3.0, -1.0, 0.5, -2.0])
    t2 = torch.tensor([-1.0, -4.0, 1.5, 0.2])
    out = combine([t1, t2], [1.0, 2.0], "ties", density=0.5)
    # density 0.5 keeps two entries of each: t1 -> [3, 0, 0, -2], t2 -> [0, -4, 1.5, 0]; the elected signs
    # (of their sum) [+, -, +, -]; per entry the mean of the weighted entries with that sign (zeros have none)
    assert torch.equal(out, torch.tensor([3.0, -8.0, 3.0, -2.0]))
    freq = combine([t1, -t1, t1], [1.0, 1.0, 1.0], "ties", density=1.0, majority_sign_method="frequency")
    assert torch.allclose(freq, t1)  # two of three agree with t1 everywhere: the mean of those two


def test_rank_pattern_and_saved_config_load_in_peft(tmp_path, same_draws):
    # rank_pattern: the linear family's rank is max(r, rank_pattern) (as peft); modules with a lower rank get
    # zero-padded factors (peft stores them at the lower rank, which its own loading then refuses)
    adapters = {"x": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
                "y": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})}
    ours, theirs = _pair(adapters)
    _add_both(ours, theirs, same_draws, ["x", "y"], [0.5, 0.5], "new", combination_type="linear")
    la, lb = _layers(ours, "new"), _layers(theirs, "new")
    for path, (A, B, s) in la.items():
        assert A.shape[0] == 4, path
        assert_rel(B @ A * s, lb[path][1] @ lb[path][0] * lb[path][2], 1e-5, path)
    ref = _logits(theirs, "new")
    assert_rel(_logits(ours, "new"), ref, 1e-5, "logits")
    saved, saved_peft = _saved_configs(ours, theirs, tmp_path, "new")
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights"):
        assert saved[field] == saved_peft[field], field
    assert sorted(saved["target_modules"]) == sorted(saved_peft["target_modules"])
    _, fresh = _pair(adapters)
    fresh.load_adapter(tmp_path / "new", "new")
    assert_rel(_logits(fresh, "new"), ref, 1e-5, "peft loads the saved adapter")


def test_regex_targets_and_modules_to_save_like_peft(tmp_path, same_draws):
    adapters = {"x": dict(r=4, lora_alpha=8, target_modules=r".*\.q_proj", modules_to_save=["lm_head"]),
                "y": dict(r=2, lora_alpha=8, target_modules=r".*\.(v_proj|up_proj)")}
    ours, theirs = _pair(adapters)
    for model in (ours, theirs):  # the new config takes the first adapter's (here: not the injection's False)
        model.peft_config["x"].init_lora_weights = "gaussian"
    _add_both(ours, theirs, same_draws, ["x", "y"], [1.0, 1.0], "new", combination_type="cat")
    assert ours.peft_config["new"].target_modules == r"(.*\.q_proj)|(.*\.(v_proj|up_proj))"
    assert ours.peft_config["new"].modules_to_save == ["lm_head"]
    head = ours.base_model.model.lm_head
    # the new adapter's copy is a fresh one of the original module (not adapter a's trained copy), as in peft
    assert torch.equal(head.modules_to_save["new"].weight, head.original_module.weight)
    assert not torch.equal(head.modules_to_save["x"].weight, head.original_module.weight)
    _assert_same_new_adapter(ours, theirs, "new", exact_factors=True)
    saved, saved_peft = _saved_configs(ours, theirs, tmp_path, "new")
    for field in ("r", "lora_alpha", "target_modules", "modules_to_save", "init_lora_weights"):
        assert saved[field] == saved_peft[field], field


def test_pissa_config_leaves_the_base_weights_alone():
    # the new adapter's weights are all computed, so it is not initialized; a "pissa" init would rewrite the
    # base weights under the existing adapters (peft's add_weighted_adapter runs it)
    ours, _ = _pair()
    ours.peft_config["x"].init_lora_weights = "pissa"
    base = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    ours.add_weighted_adapter(["x", "y"], [1.0, 1.0], "new", combination_type="cat")
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in base.items())
    assert ours.peft_config["new"].init_lora_weights == "pissa"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, dict(model.peft_config)


def _assert_unchanged(model, before):
    sd, configs = before
    after = model.state_dict()
    assert sorted(after) == sorted(sd) and all(torch.equal(after[k], sd[k]) for k in sd)
    assert model.peft_config == configs


@pytest.mark.parametrize("args, kwargs, match", [
    ((["x", "nope"], [1.0, 1.0]), {}, r"Adapter nope does not exist; this model has \['x', 'y', 'z'\]"),
    ((["x", "z"], [1.0, 1.0]), dict(combination_type="linear"), "same r value"),
    ((["x", "z"], [1.0, 1.0]), dict(combination_type="dare_ties", density=0.5), "same r value"),
    ((["x", "y"], [1.0, 1.0]), dict(combination_type="ties", density=-0.1), "Density should be >= 0"),
])
def test_refusals_like_peft(args, kwargs, match):
    ours, theirs = _pair()
    before = _state(ours)
    with pytest.raises(ValueError, match=match):
        ours.add_weighted_adapter(*args, "new", **kwargs)
    _assert_unchanged(ours, before)
    with pytest.raises(ValueError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_weighted_adapter(*args, "new", **kwargs)  # peft refuses it too


def test_refusals_of_incompatible_configs_like_peft():
    mixed = {"x": dict(r=4, lora_alpha=8, target_modules=["q_proj"]),
             "y": dict(r=4, lora_alpha=8, target_modules=r".*\.v_proj")}
    both_save = {"x": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                 "y": dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"])}
    for adapters, match in ((mixed, "same target modules type"), (both_save, "modules_to_save")):
        ours, theirs = _pair(adapters)
        before = _state(ours)
        with pytest.raises(ValueError, match=match):
            ours.add_weighted_adapter(["x", "y"], [1.0, 1.0], "new", combination_type="cat")
        _assert_unchanged(ours, before)
        with pytest.raises(ValueError, match=match):
            theirs.add_weighted_adapter(["x", "y"], [1.0, 1.0], "new", combination_type="cat")


@pytest.mark.parametrize("args, kwargs, match", [
    ((["x", "y"], [1.0]), {}, "one value per adapter"),
    (([], []), {}, "non-empty list"),
    ((["x"], [1.0]), dict(combination_type="average"), "Invalid combination_type"),
    ((["x", "y"], [1.0, 1.0]), dict(combination_type="ties"), "needs density"),
    ((["x", "y"], [1.0, 1.0]), dict(combination_type="dare_ties", density=0.5, majority_sign_method="mean"),
     "majority_sign_method"),
    ((["x", "y", "z"], [1.0, 1.0, 1.0]), dict(svd_rank=40), "svd rank 40 is larger"),  # q_proj is 32 x 32
])
def test_clear_errors_where_peft_fails_obscurely_or_not_at_all(args, kwargs, match):
    ours, _ = _pair()
    before = _state(ours)
    with pytest.raises(ValueError, match=match):
        ours.add_weighted_adapter(*args, "new", **kwargs)
    _assert_unchanged(ours, before)  # a failure part-way (svd rank) is undone too


def test_modules_no_adapter_holds_are_refused_like_peft():
    # the new config is x's with the union of the targets: x's layers_to_transform then picks v_proj of layer
    # 0, which neither adapter adapts (peft fails there too, for "linear" with an IndexError)
    adapters = {"x": dict(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[0]),
                "y": dict(r=4, lora_alpha=8, target_modules=["v_proj"], layers_to_transform=[1])}
    ours, theirs = _pair(adapters)
    before = _state(ours)
    for combination_type in ("cat", "linear", "svd"):
        with pytest.raises(ValueError, match=r"adapts 'model\.layers\.0\.self_attn\.v_proj', but none of"):
            ours.add_weighted_adapter(["x", "y"], [1.0, 1.0], "new", combination_type=combination_type)
        _assert_unchanged(ours, before)  # the layer wrapped for the new adapter alone is unwrapped again
        assert type(ours.base_model.model.model.layers[0].self_attn.v_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="No matching LoRAs"):
        theirs.add_weighted_adapter(["x", "y"], [1.0, 1.0], "new", combination_type="cat")


def test_existing_name_is_left_alone_like_peft():
    ours, _ = _pair()
    before = _state(ours)
    with pytest.warns(UserWarning, match="exists already"):
        ours.add_weighted_adapter(["x", "y"], [1.0, 1.0], "z", combination_type="cat")
    _assert_unchanged(ours, before)


def test_reachable_from_lora_model_and_density_one_warns():
    ours, _ = _pair()
    with pytest.warns(UserWarning, match="no pruning"):
        ours.base_model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "new", combination_type="ties", density=1.0)
    assert "new" in ours.peft_config and ours.active_adapter == "x"
