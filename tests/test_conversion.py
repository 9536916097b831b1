"""convert_to_lora / save_as_lora (fastpeft.conversion): adapters turned into plain LoRA.

References: the adapter's own output (a full-rank conversion must reproduce the model's logits, loaded back by
fastpeft and by peft 0.21.2), the best rank-k approximation of ΔW computed here in float64 from the adapter's
parameters by each method's definition (not through fastpeft's delta functions), and peft's own convert_to_lora
on the same LoRA weights (products B·A and energy-threshold ranks).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastpeft
from helpers import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

V = 96
IDS = torch.tensor([[3, 7, 11, 5, 2, 9, 14], [4, 4, 8, 1, 6, 2, 30]])


def _base(kind, seed=1):
    torch.manual_seed(seed)
    return (tiny_gpt2 if kind == "gpt2" else tiny_llama)(V).eval()


def _perturb(model, seed=3):
    """Move every trainable adapter tensor off its init (LoRA's B is zero there: non-vacuous)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and any(k in name for k in ("lora_", "ia3_")):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _loaded(lib, kind, path, quantized=False):
    base = _base(kind)
    if quantized:
        base = fastpeft.quantize_model(base, progressbar=False)
    return lib.PeftModel.from_pretrained(base, str(path)).eval()


def _best_rank_k(delta64, k):
    U, S, Vh = torch.linalg.svd(delta64, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def _factor_products(tensors, prefix="base_model.model."):
    """layer name → B·A (float64) of a converted LoRA state dict (linear layers)."""
    out = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            out[name.removeprefix(prefix)] = tensors[f"{name}.lora_B.weight"].double() @ A.double()
    return out


# --------------------------------------------------------------------------- full rank reproduces the adapter
FULL = {  # name: (base kind, config factory, a rank at which every adapted layer is converted whole)
    "lora": ("llama", lambda lib: lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                 task_type="CAUSAL_LM"), 16),
    "lora_conv1d": ("gpt2", lambda lib: lib.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                       fan_in_fan_out=True, use_rslora=True), 32),
    "dora": ("llama", lambda lib: lib.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"],
                                                 use_dora=True), 16),
    "adalora": ("llama", lambda lib: lib.AdaLoraConfig(init_r=6, target_r=4, total_step=10,
                                                       target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), 6),
    "ia3_gpt2": ("gpt2", lambda lib: lib.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                   feedforward_modules=["mlp.c_proj"], task_type="CAUSAL_LM"), 32),
    # k_proj (32 → 16) and o_proj (32 × 32) differ in full rank: the energy threshold 1.0 takes each whole
    "ia3_llama": ("llama", lambda lib: lib.IA3Config(target_modules=["k_proj", "o_proj"],
                                                     feedforward_modules=["o_proj"], task_type="CAUSAL_LM"), 1.0),
}


@pytest.mark.parametrize("case", list(FULL))
def test_full_rank_conversion_reproduces_the_adapter(case, tmp_path):
    """At the layers' full rank the converted LoRA adapter gives the original model's logits, loaded by fastpeft
    and by peft (the converted files are peft's format)."""
    kind, make, full = FULL[case]
    model = _perturb(fastpeft.get_peft_model(_base(kind), make(fastpeft)))
    ref = _logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (LoRA → LoRA warns, as peft)
        fastpeft.save_as_lora(tmp_path, model, full)
    for lib in (fastpeft, peft):
        torch.testing.assert_close(_logits(_loaded(lib, kind, tmp_path)), ref, atol=2e-5, rtol=1e-4)
    config = fastpeft.LoraConfig.from_pretrained(tmp_path)
    assert config.lora_alpha == config.r  # scale 1: the singular values are in B
    assert config.lora_bias == (case == "ia3_gpt2")  # (IA)³ scaling GPT-2's c_attn bias: a lora_B bias
    assert config.task_type == model.peft_config["default"].task_type
    if case == "ia3_llama":
        assert config.r == 32 and set(config.rank_pattern.values()) == {16}
        with pytest.raises(ValueError, match="The chosen rank 32 is larger than the weight shape \\(16\\)"):
            fastpeft.convert_to_lora(model, 32)


def test_full_rank_conversion_on_a_4bit_base(tmp_path):
    """LoRA and DoRA adapters on an NF4 base: DoRA's change is taken against the dequantized base weight."""
    for use_dora in (False, True):
        base = fastpeft.quantize_model(_base("llama"), progressbar=False)
        model = _perturb(fastpeft.get_peft_model(base, fastpeft.LoraConfig(
            r=4, target_modules=["k_proj", "v_proj"], use_dora=use_dora)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fastpeft.save_as_lora(tmp_path / str(use_dora), model, 16)
        got = _logits(_loaded(fastpeft, "llama", tmp_path / str(use_dora), quantized=True))
        torch.testing.assert_close(got, _logits(model), atol=2e-5, rtol=1e-4)


def test_embedding_and_convolution_layers(tmp_path):
    """LoRA on nn.Embedding (lora_embedding_A/B) and nn.Conv2d (A with the base's kernel, B 1×1): full rank
    reproduces the outputs, and B·A of each equals its ΔW."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 1)).eval()
    model = _perturb(fastpeft.get_peft_model(net, fastpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"])))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, tensors = fastpeft.convert_to_lora(model, 2)
        fastpeft.save_as_lora(tmp_path, model, 2)
    assert tensors["base_model.model.0.lora_A.weight"].shape == (2, 3, 3, 3)
    assert tensors["base_model.model.0.lora_B.weight"].shape == (5, 2, 1, 1)
    torch.manual_seed(0)
    net2 = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 1)).eval()
    with torch.no_grad():
        got = fastpeft.PeftModel.from_pretrained(net2, str(tmp_path)).eval()(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)

    emb = _perturb(fastpeft.get_peft_model(_base("llama"), fastpeft.LoraConfig(r=3, target_modules=["embed_tokens"])))
    layer = emb.base_model.model.model.embed_tokens
    A, B = layer.lora_embedding_A["default"].double(), layer.lora_embedding_B["default"].double()
    delta = (B @ A).t() * layer.scaling["default"]  # (V, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, tensors = fastpeft.convert_to_lora(emb, 2)
    key = "base_model.model.model.embed_tokens"
    got = (tensors[f"{key}.lora_embedding_B"].double() @ tensors[f"{key}.lora_embedding_A"].double()).t()
    torch.testing.assert_close(got, _best_rank_k(delta.t(), 2).t(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- truncation against float64
def _reference_deltas(model, case):
    """ΔW (out, in) of each adapted linear layer in float64, from the parameters by the method's definition."""
    out = {}
    for name, m in model.named_modules():
        key = name.removeprefix("base_model.model.")
        if case == "adalora" and hasattr(m, "lora_E"):
            A, B, E = (t["default"].double() for t in (m.lora_A, m.lora_B, m.lora_E))
            out[key] = B @ (A * E) * m.scaling["default"] / (m.ranknum["default"].double() + 1e-5)
        elif case.startswith("ia3") and hasattr(m, "ia3_l"):
            w = m.base_layer.weight.double()
            w = w.t() if m.fan_in_fan_out else w
            scale = m.ia3_l["default"].double().reshape(-1)
            out[key] = w * ((scale - 1).view(1, -1) if m.is_feedforward else (scale - 1).view(-1, 1))
        elif case.startswith("lora") and hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}) \
                and isinstance(m.lora_A["default"], nn.Linear):
            delta = m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double() * m.scaling["default"]
            out[key] = delta
    return out


@pytest.mark.parametrize("case", ["lora_conv1d", "adalora", "ia3_gpt2"])
def test_truncated_conversion_is_the_best_rank_k_approximation(case):
    """At rank 2 each layer's B·A is the best rank-2 approximation of its ΔW (Eckart–Young, float64 here)."""
    kind, make, _ = FULL[case]
    model = _perturb(fastpeft.get_peft_model(_base(kind), make(fastpeft)))
    refs = _reference_deltas(model, case)
    assert refs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, tensors = fastpeft.convert_to_lora(model, 2)
    got = _factor_products(tensors)
    assert sorted(got) == sorted(refs) == sorted(config.target_modules)
    for key, delta in refs.items():
        torch.testing.assert_close(got[key], _best_rank_k(delta, 2), atol=2e-6, rtol=1e-5, msg=key)
    assert config.r == 2 and config.rank_pattern == {}


def test_energy_threshold_ranks():
    """A float rank keeps, per layer, the fewest singular directions whose squared singular values reach that
    share of the total (computed here in float64), written to rank_pattern/alpha_pattern."""
    model = _perturb(fastpeft.get_peft_model(_base("gpt2"), FULL["ia3_gpt2"][1](fastpeft)))
    for threshold in (0.5, 0.9, 0.999):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config, tensors = fastpeft.convert_to_lora(model, threshold)
        want = {}
        for key, delta in _reference_deltas(model, "ia3_gpt2").items():
            energy = torch.linalg.svdvals(delta) ** 2
            share = torch.cumsum(energy, 0) / energy.sum()
            want[key] = int((share < threshold - 1e-9).sum()) + 1
        got = {k: config.rank_pattern.get(k, config.r) for k in config.target_modules}
        assert got == want
        assert config.alpha_pattern == config.rank_pattern
        for key, rank in want.items():
            assert tensors[f"base_model.model.{key}.lora_A.weight"].shape[0] == rank


# --------------------------------------------------------------------------- against peft's convert_to_lora
@pytest.mark.parametrize("rank", [2, 4, 0.8])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_conversion_matches_peft(kind, rank):
    """The same LoRA weights in peft and fastpeft: peft's convert_to_lora and fastpeft's give the same B·A per
    layer and the same per-layer ranks; both warn that the adapter is already LoRA."""
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["c_attn", "c_proj"]
    extra = {"fan_in_fan_out": True} if kind == "gpt2" else {}
    theirs = peft.get_peft_model(_base(kind), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra))
    _perturb(theirs)
    ours = fastpeft.get_peft_model(_base(kind), fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                     **extra))
    fastpeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    torch.testing.assert_close(_logits(ours.eval()), _logits(theirs))
    with pytest.warns(UserWarning, match="already a LoRA adapter"):
        their_config, their_tensors = peft.convert_to_lora(theirs, rank)
    with pytest.warns(UserWarning, match="already a LoRA adapter"):
        our_config, our_tensors = fastpeft.convert_to_lora(ours, rank)
    mine, peft_products = _factor_products(our_tensors), _factor_products(their_tensors)
    assert sorted(mine) == sorted(peft_products)
    for key in mine:
        torch.testing.assert_close(mine[key], peft_products[key], atol=1e-5, rtol=1e-5, msg=key)
        their_rank = their_config.rank_pattern.get(key, their_config.r)
        assert our_config.rank_pattern.get(key, our_config.r) == their_rank


# --------------------------------------------------------------------------- what comes along, what is refused
def test_modules_to_save_and_other_adapters(tmp_path):
    """modules_to_save's trained copy comes along under peft's saved name; with two adapters, the named one is
    converted (its own layers and copy), the other left out."""
    model = fastpeft.get_peft_model(_base("llama"), fastpeft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                        modules_to_save=["lm_head"]))
    model.add_adapter("other", fastpeft.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]))
    _perturb(model)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["other"].weight.mul_(1.5)
    model.set_adapter("other")
    ref = _logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, tensors = fastpeft.convert_to_lora(model, 2, adapter_name="other")
        fastpeft.save_as_lora(tmp_path, model, 2, adapter_name="other")
    assert config.target_modules == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert config.modules_to_save == ["lm_head"]
    head = model.base_model.model.lm_head.modules_to_save["other"].weight
    torch.testing.assert_close(tensors["base_model.model.lm_head.weight"], head.detach())
    for lib in (fastpeft, peft):
        torch.testing.assert_close(_logits(_loaded(lib, "llama", tmp_path)), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("make, error, match", [
    (lambda: fastpeft.BottleneckConfig(bottleneck_size=4, task_type="CAUSAL_LM"), TypeError,
     "do not support LoRA conversion: BottleneckLinear"),
    (lambda: fastpeft.LNTuningConfig(task_type="CAUSAL_LM"), TypeError, "do not support LoRA conversion"),
    (lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"), TypeError,
     "Could not detect any layer"),
    (lambda: fastpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2]), TypeError,
     "do not support LoRA conversion"),
    (lambda: fastpeft.LoraConfig(target_modules=["q_proj"], lora_bias=True), ValueError, "lora_B bias"),
    (lambda: fastpeft.LoraConfig(target_modules=["q_proj"], bias="lora_only"), ValueError, "bias=lora_only"),
    (lambda: fastpeft.LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=[5]), ValueError, "aLoRA"),
    (lambda: fastpeft.FreezeConfig(num_trainable_layers=1, task_type="CAUSAL_LM"), TypeError,
     "Could not detect any layer"),
], ids=["bottleneck", "ln_tuning", "prompt_tuning", "trainable_tokens", "lora_bias", "bias", "alora", "freeze"])
def test_refusals(make, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastpeft.get_peft_model(_base("llama"), make())
        with pytest.raises(error, match=match):
            fastpeft.convert_to_lora(model, 2)


def test_bad_ranks_and_names():
    config = fastpeft.IA3Config(target_modules=["q_proj"], feedforward_modules=[], task_type="CAUSAL_LM")
    model = fastpeft.get_peft_model(_base("llama"), config)
    for rank, error in ((0, ValueError), (-1, ValueError), (1.5, ValueError), (0.0, ValueError), (True, TypeError),
                        ("8", TypeError)):
        with pytest.raises(error):
            fastpeft.convert_to_lora(model, rank)
    with pytest.raises(ValueError, match="No layer holds an adapter named 'nope'.*'default'"):
        fastpeft.convert_to_lora(model, 2, adapter_name="nope")
    grouped = fastpeft.get_peft_model(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)),
                                      fastpeft.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(TypeError, match="groups > 1"):
        fastpeft.convert_to_lora(grouped, 2)


def test_progressbar_and_compile_kwargs(capsys):
    """progressbar shows tqdm's bar; compile_kwargs runs the factorization through torch.compile (eager backend
    here) with the same result."""
    model = _perturb(fastpeft.get_peft_model(_base("gpt2"), FULL["ia3_gpt2"][1](fastpeft)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, plain = fastpeft.convert_to_lora(model, 3, progressbar=True)
        assert "Converting to LoRA" in capsys.readouterr().err
        _, compiled = fastpeft.convert_to_lora(model, 3, compile_kwargs={"backend": "eager"})
    for key in plain:
        torch.testing.assert_close(compiled[key], plain[key])
