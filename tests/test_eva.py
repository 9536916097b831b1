"""EVA (``init_lora_weights="eva"``) against peft 0.21 itself.

fastpeft and peft build the same tiny model from the same seed and run EVA over the same few batches (no
state copied between them): lora_A, the rank / alpha redistribution, the rewritten config, the saved
``adapter_config.json`` and even torch's generator state afterwards must agree; adapters saved by either
load in the other with the same outputs. Where peft is wrong (whitening layers that share inputs) the
check is against fastpeft's own unwhitened vectors instead.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.layers import FastLoraLinear
from helpers import assert_rel, tiny_llama

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

V = 96
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # layers whose input another layer also gets


def _batches(n=4, labels=True):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(1, V, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 12:] = 0  # padding
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            lab = ids.clone()
            lab[:, :3] = -100  # prompt tokens
            batch["labels"] = lab
        out.append(batch)
    return out


class Base:
    """A tiny Llama's weights, rebuilt as fresh identical copies."""

    def __init__(self, **overrides):
        self.overrides = overrides
        torch.manual_seed(0)
        self.state = {k: v.clone() for k, v in tiny_llama(V, **overrides).state_dict().items()}

    def fresh(self):
        model = tiny_llama(V, **self.overrides).eval()
        model.load_state_dict(self.state)
        return model


def _eva_both(base_factory, targets, eva_kw, batches, r=4, lora_alpha=8, **init_kw):
    """(fastpeft model, peft model, generator draw after each): built and EVA-initialized independently."""
    out = []
    for lib in (fastpeft, peft):
        config = lib.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, init_lora_weights="eva",
                                eva_config=lib.EvaConfig(**eva_kw))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(1)
            model = lib.get_peft_model(base_factory(), config)
            lib.initialize_lora_eva_weights(model, batches, show_progress_bar=False, **init_kw)
        out.append((model, torch.rand(4)))
    (ours, ours_next), (theirs, theirs_next) = out
    return ours, theirs, ours_next, theirs_next


def _assert_same(ours, theirs, tol=1e-6, skip=()):
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k, p in a.items():
        if any(s in k for s in skip):
            continue
        assert p.shape == b[k].shape, (k, p.shape, b[k].shape)
        assert_rel(p.detach(), b[k].detach(), tol, k)
    ca, cb = ours.peft_config["default"], theirs.peft_config["default"]
    assert ca.rank_pattern == cb.rank_pattern
    assert ca.alpha_pattern == cb.alpha_pattern
    assert set(ca.target_modules) == set(cb.target_modules)
    assert ca.init_lora_weights == cb.init_lora_weights == "eva"


@pytest.mark.parametrize("eva_kw,targets", [
    (dict(tau=0.99), ALL),                                   # rho=2: ranks move (rank/alpha patterns)
    (dict(tau=0.95, rho=1.0, adjust_scaling_factors=False), ALL),
    (dict(tau=0.95, rho=3.0, use_label_mask=False), ALL + ["embed_tokens"]),  # embedding: re-init as True
])
def test_eva_matches_peft(eva_kw, targets):
    base = Base()
    ours, theirs, ours_next, theirs_next = _eva_both(base.fresh, targets, eva_kw, _batches())
    _assert_same(ours, theirs)
    if eva_kw.get("rho", 2.0) > 1.0:
        assert ours.peft_config["default"].rank_pattern, "the data should have moved some ranks"
    # same draws from torch's generator (rebuilt layers, embedding re-init), so what follows stays in step
    assert torch.equal(ours_next, theirs_next)
    for name, layer in ours.named_modules():
        if isinstance(layer, FastLoraLinear):
            assert not layer.lora_B["default"].weight.any(), name  # an identity at init
            A = layer.lora_A["default"].weight
            assert torch.allclose(A @ A.t(), torch.eye(A.shape[0]), atol=1e-4), name  # orthonormal vectors
            assert layer.scaling["default"] == pytest.approx(
                2.0 if eva_kw.get("adjust_scaling_factors", True) else 8 / layer.r["default"])


def test_long_target_lists_are_condensed_as_peft_does(tmp_path):
    """≥ 20 adapted layers: target_modules becomes the minimal suffixes (a set in peft, saved sorted here)."""
    base = Base(num_hidden_layers=3)
    ours, theirs, _, _ = _eva_both(base.fresh, ALL, dict(tau=0.95, rho=4.0), _batches())
    _assert_same(ours, theirs)
    assert set(ours.peft_config["default"].target_modules) == set(ALL)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("init_lora_weights", "eva_config", "rank_pattern", "alpha_pattern", "r", "lora_alpha"):
        assert a[key] == b[key], key
    assert a["target_modules"] == sorted(b["target_modules"])


class Three(nn.Module):
    """Three linear layers on three inputs: two low-rank (their variance in a few directions), one isotropic."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x):
        return self.a(x[0]) + self.b(x[1]) + self.c(x[2])


def _three_batches():
    g = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g))[0].t()  # orthonormal rows: equal variances
    mix1, mix2 = basis[:4], basis[4:6]
    out = []
    for _ in range(3):
        out.append([torch.randn(40, 4, generator=g) @ mix1, torch.randn(40, 2, generator=g) @ mix2,
                    torch.randn(40, 16, generator=g)])
    return out


def _three():
    torch.manual_seed(0)
    return Three()


def test_rank_zero_layer_loses_its_adapter_and_custom_functions(tmp_path):
    """The isotropic layer gets rank 0: no adapter there (back to nn.Linear), as peft; custom forward_fn and
    prepare_*_fn=None (peft's documented ways for non-language-model data)."""
    kw = dict(forward_fn=lambda model, batch: model(batch), prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None)
    ours, theirs, ours_next, theirs_next = _eva_both(_three, ["a", "b", "c"], dict(tau=0.99, rho=3.0),
                                                     _three_batches(), r=2, lora_alpha=4, **kw)
    _assert_same(ours, theirs)
    assert torch.equal(ours_next, theirs_next)
    config = ours.peft_config["default"]
    assert config.rank_pattern == {"a": 4} and config.alpha_pattern == {"a": 8.0}
    assert config.target_modules == ["a", "b"]
    assert type(ours.base_model.model.c) is nn.Linear
    assert "c" not in ours.base_model.targeted_module_names
    # saved and loaded by peft: the same modules and weights
    ours.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(_three(), tmp_path / "ours")
    _assert_same(ours, loaded)


def _train_like(model):
    """The same non-zero B in every adapted layer (what training would leave), in both libraries."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                g = torch.Generator().manual_seed(len(name))
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_saved_adapters_load_across_libraries(tmp_path):
    base = Base()
    batches = _batches()
    ours, theirs, _, _ = _eva_both(base.fresh, ALL, dict(tau=0.99), batches)
    for lib, model in (("fastpeft", ours), ("peft", theirs)):
        _train_like(model)
        model.save_pretrained(tmp_path / lib)
    trained = _logits(ours, batches[0])
    assert_rel(_logits(theirs, batches[0]), trained, 1e-5, "same adapters")
    assert not torch.allclose(trained, _logits(base.fresh(), batches[0]), atol=1e-3)
    for lib, loader in (("fastpeft", peft.PeftModel), ("peft", fastpeft.PeftModel)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = loader.from_pretrained(base.fresh(), tmp_path / lib)
        assert_rel(_logits(loaded, batches[0]), trained, 1e-5, f"{lib}'s adapter loaded by the other")
        assert loaded.peft_config["default"].rank_pattern == ours.peft_config["default"].rank_pattern
    cfg = fastpeft.LoraConfig.from_pretrained(tmp_path / "peft")
    assert isinstance(cfg.eva_config, fastpeft.EvaConfig) and cfg.eva_config.tau == 0.99


def test_get_eva_state_dict_on_the_base_model():
    """Computed on the plain model (keys without the PeftModel prefix), as peft's; then loaded into a fastpeft
    model (peft itself only matches prefixed keys: it would warn and fall back to init True)."""
    base = Base()
    batches = _batches()
    sds = []
    for lib in (fastpeft, peft):
        config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights="eva",
                                eva_config=lib.EvaConfig(tau=0.99))
        sds.append((config, lib.get_eva_state_dict(base.fresh(), batches, peft_config=config,
                                                   show_progress_bar=False)))
    (config, ours), (_, theirs) = sds
    assert ours.keys() == theirs.keys() and all(not k.startswith("base_model") for k in ours)
    for k in ours:
        assert ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]), k
    torch.manual_seed(1)
    model = fastpeft.get_peft_model(base.fresh(), config)
    fastpeft.initialize_lora_eva_weights(model, eva_state_dict=ours)
    reference, _, _, _ = _eva_both(base.fresh, ALL, dict(tau=0.99), batches)
    _assert_same(model, reference)


def test_whiten():
    """Whitened vectors = the plain ones / √singular value. Layers with inputs of their own match peft; for
    layers sharing inputs (q/k/v, gate/up) peft divides the shared vectors in place once per layer (so several
    times), fastpeft once: checked against its own unwhitened vectors instead."""
    base = Base()
    batches = _batches()
    ours, theirs, _, _ = _eva_both(base.fresh, ALL, dict(tau=0.99, whiten=True), batches)
    _assert_same(ours, theirs, skip=SHARED)
    plain, _, _, _ = _eva_both(base.fresh, ALL, dict(tau=0.99), batches)
    ratios = {}
    for name, layer in ours.named_modules():
        if isinstance(layer, FastLoraLinear):
            white = layer.lora_A["default"].weight.double()
            ref = plain.get_submodule(name).lora_A["default"].weight.double()
            ratio = ref / white  # each row: √s, the same across the row
            assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4), name
            ratios[name] = ratio[:, 0]
    for layer in range(2):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            got = [v for k, v in ratios.items() if f"layers.{layer}." in k and k.endswith(group)]
            n = min(len(v) for v in got)
            for v in got[1:]:
                assert torch.allclose(v[:n], got[0][:n], rtol=1e-5), (layer, group)  # one √s for the group


def test_progress_bar(capsys):
    torch.manual_seed(1)
    config = fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva",
                                 eva_config=fastpeft.EvaConfig(tau=0.9))
    model = fastpeft.get_peft_model(Base().fresh(), config)
    fastpeft.initialize_lora_eva_weights(model, _batches())
    assert "layers have converged" in capsys.readouterr().err


def test_config_fields_match_peft(tmp_path):
    with pytest.warns(UserWarning, match="Using default EVA config"):
        ours = fastpeft.LoraConfig(init_lora_weights="eva", target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.LoraConfig(init_lora_weights="eva", target_modules=["q_proj"])
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert a["eva_config"] == b["eva_config"] and a["init_lora_weights"] == "eva"
    assert peft.LoraConfig.from_pretrained(tmp_path / "ours").eva_config == theirs.eva_config
    assert fastpeft.LoraConfig(init_lora_weights="eva", eva_config=peft.EvaConfig(rho=1.5)).eva_config.rho == 1.5
    with pytest.warns(UserWarning, match="will be ignored"):
        fastpeft.LoraConfig(eva_config=fastpeft.EvaConfig())
    assert fastpeft.LoraConfig().to_dict()["eva_config"] is None


def test_bad_input_raises_clear_errors():
    batches = _batches()
    with pytest.raises(ValueError, match="rho"):
        fastpeft.EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="tau"):
        fastpeft.EvaConfig(tau=1.5)
    with pytest.raises(ValueError, match="unknown eva_config"):
        fastpeft.LoraConfig(init_lora_weights="eva", eva_config={"rhoo": 2})
    with pytest.raises(TypeError, match="eva_config"):
        fastpeft.LoraConfig(init_lora_weights="eva", eva_config=3)

    def model(init="eva", targets=("q_proj",), **eva):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fastpeft.get_peft_model(Base().fresh(), fastpeft.LoraConfig(
                r=4, target_modules=list(targets), init_lora_weights=init, eva_config=fastpeft.EvaConfig(**eva)))

    m = model()
    with pytest.raises(ValueError, match="dataloader is required"):
        fastpeft.initialize_lora_eva_weights(m)
    with pytest.raises(ValueError, match="model must be a PeftModel"):
        fastpeft.initialize_lora_eva_weights(Base().fresh(), batches)
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        fastpeft.initialize_lora_eva_weights(model(init=True), batches)
    with pytest.raises(ValueError, match="adapter 'other' not found"):
        fastpeft.initialize_lora_eva_weights(m, batches, adapter_name="other")
    with pytest.raises(ValueError, match="dataloader is empty"):
        fastpeft.initialize_lora_eva_weights(m, [])
    with pytest.raises(TypeError, match="must have a length"):
        fastpeft.initialize_lora_eva_weights(m, iter(batches))
    with pytest.raises(ValueError, match="not found in the model"):
        fastpeft.initialize_lora_eva_weights(m, batches, prepare_layer_inputs_fn={"nope": lambda *a: a[0]})
    with pytest.raises(TypeError, match="must be a dictionary"):
        fastpeft.initialize_lora_eva_weights(m, [[torch.zeros(1)]], show_progress_bar=False)
    with pytest.raises(ValueError, match="peft_config is required"):
        fastpeft.get_eva_state_dict(Base().fresh(), batches)
    with pytest.raises(ValueError, match="not LoRA linear layers"):
        fastpeft.initialize_lora_eva_weights(m, eva_state_dict={"model.layers.0.mlp.up_proj": torch.zeros(4, 32)})
    with pytest.raises(ValueError, match="2-D"):
        fastpeft.initialize_lora_eva_weights(m, eva_state_dict={"model.layers.0.self_attn.q_proj": torch.zeros(4)})
    with pytest.raises(ValueError, match="input features"):
        fastpeft.initialize_lora_eva_weights(m, eva_state_dict={"model.layers.0.self_attn.q_proj": torch.zeros(4, 7)})
    # too few tokens per batch for round(r * rho) = 8 components: an error after one pass (peft loops forever)
    tiny = [{"input_ids": b["input_ids"][:1, :5]} for b in batches]
    with pytest.raises(ValueError, match="at least as many rows"):
        fastpeft.initialize_lora_eva_weights(m, tiny, show_progress_bar=False)
    with pytest.raises(ValueError, match="needs 80 components .* only 32 features"):
        fastpeft.initialize_lora_eva_weights(model(rho=20.0), batches, show_progress_bar=False)
    two = model()
    two.add_adapter("second", fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    two.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="single active adapter"):
        fastpeft.initialize_lora_eva_weights(two, batches)
    # the state dict given with a dataloader: used, with a warning that the dataloader is not read
    sd = fastpeft.get_eva_state_dict(model(), batches, show_progress_bar=False)
    with pytest.warns(UserWarning, match="dataloader is not read"):
        fastpeft.initialize_lora_eva_weights(model(), batches, eva_state_dict=sd)


def test_train_cli_runs_eva_on_the_training_batches(tmp_path):
    from fastpeft.train import build_default_model, parse_args, train

    rows = [{"prompt": f"what is {i}+{i % 7}?", "response": f" {i + i % 7}"} for i in range(32)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    args = parse_args(["--data", str(tmp_path / "d.jsonl"), "--eval-split", "0", "--batch-size", "8", "--max-steps",
                       "1", "--r", "4", "--output", str(out), "--no-progress", "--init-lora-weights", "eva",
                       "--method-options", json.dumps({"eva_config": {"tau": 0.98}}),
                       "--target-modules", "q_proj,v_proj,down_proj", "--modules-to-save", "none"])
    assert args.init_lora_weights == "eva"
    train(args)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva"
    assert saved["eva_config"]["rho"] == 2.0 and saved["eva_config"]["tau"] == 0.98
    assert saved["rank_pattern"], "EVA redistributed no rank: it did not run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build_default_model(), out)
    ranks = {n.replace("base_model.model.", ""): m.r["default"] for n, m in loaded.named_modules()
             if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, rank in saved["rank_pattern"].items():
        assert ranks[name] == rank
