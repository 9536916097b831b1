"""LoRA on convolutions (``FastLoraConv``: nn.Conv1d/Conv2d/Conv3d targets) against peft's ``lora.ConvNd`` with the
same weights — outputs, gradients, dropout masks, merge, DoRA, several adapters, mixed batches, files both ways —
and, where fastpeft deliberately differs (dilation, padding modes), against a plain reference built from the
delta weight."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpeft
from fastpeft import FastLoraConv

peft = pytest.importorskip("peft")

_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class TinyCNN(nn.Module):
    """Conv1d → Conv2d → Conv3d → Linear, small enough for CPU, with strides, padding and a bias-free layer."""

    def __init__(self, groups: int = 1, c3_bias: bool = False):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=groups)
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), bias=c3_bias)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):  # x: (N, 3, 64)
        h = self.c1(x).view(x.shape[0], 8, 8, 8)
        h = self.c2(h)  # (N, 8, 4, 4)
        h3 = self.c3(h.view(h.shape[0], 2, 4, 4, 4))  # (N, 4, 4, 2, 2)
        return self.lin(h.mean((2, 3))) + h3.flatten(1).mean(1, keepdim=True)


def _wrap_both(base: nn.Module, kw: dict, seed: int | None = None):
    """peft's and fastpeft's LoraConfig(**kw) on two copies of ``base`` (each drawn after ``manual_seed(seed)``
    when given), warnings silenced."""
    models = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lib in (peft, fastpeft):
            if seed is not None:
                torch.manual_seed(seed)
            models.append(lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**kw)))
    return models


def _twins(config_kwargs: dict, *, seed: int = 0, model_kwargs: dict | None = None, same_init: bool = True):
    """The same TinyCNN wrapped by peft and by fastpeft, drawn under the same seed (``same_init``: the adapter
    weights are then equal without copying); fastpeft then loads peft's state dict (its keys are peft's)."""
    torch.manual_seed(seed)
    base = TinyCNN(**(model_kwargs or {}))
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["c1", "c2", "c3", "lin"], **config_kwargs}
    p, f = _wrap_both(base, kw, seed + 1)
    ps, fs = p.state_dict(), f.state_dict()
    assert set(ps) == set(fs)
    if same_init:
        for key in ps:
            assert torch.allclose(ps[key].float(), fs[key].float(), rtol=1e-6, atol=1e-7), key
    f.load_state_dict(ps)
    return base, p, f


def _load(lib, base: nn.Module, path) -> nn.Module:
    """``lib.PeftModel.from_pretrained`` onto a copy of ``base``, in eval mode (warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def _random_adapters(model: nn.Module, seed: int = 5) -> None:
    """Nonzero B (and lora_B bias) everywhere, so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_same(p, f, x, *, train: bool = False, seed: int = 3, atol: float = 1e-5):
    p.train(train)
    f.train(train)
    p.zero_grad(set_to_none=True)
    f.zero_grad(set_to_none=True)
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(seed)
    yp = p(xp)
    torch.manual_seed(seed)
    yf = f(xf)
    torch.testing.assert_close(yf, yp, rtol=1e-5, atol=atol)
    g = torch.randn_like(yp)
    yp.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, xp.grad, rtol=1e-5, atol=atol)
    gp, gf = _grads(p), _grads(f)
    assert set(gp) == set(gf)
    for name in gp:
        torch.testing.assert_close(gf[name], gp[name], rtol=1e-5, atol=atol, msg=name)
    return yf.detach()


OPTIONS = {
    "lora": {},
    "dora": {"use_dora": True},
    "lora_bias": {"lora_bias": True},
    "rslora_gaussian": {"use_rslora": True, "init_lora_weights": "gaussian"},
    "init_false": {"init_lora_weights": False},
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_peft_outputs_gradients_merge_and_files(option, tmp_path):
    base, p, f = _twins(OPTIONS[option], model_kwargs={"c3_bias": option == "lora_bias"})
    kinds = {n: type(m).__name__ for n, m in f.named_modules() if isinstance(m, FastLoraConv)}
    assert sorted(kinds) == ["base_model.model.c1", "base_model.model.c2", "base_model.model.c3"]
    _random_adapters(p)
    f.load_state_dict(p.state_dict())
    x = torch.randn(3, 3, 64)
    y = _check_same(p, f, x)
    # merge: the same base weights as peft's merge, the same output as unmerged
    with torch.no_grad():
        p.merge_adapter()
        f.merge_adapter()
        for key, value in p.state_dict().items():
            torch.testing.assert_close(f.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(f(x), y, rtol=1e-5, atol=1e-5)
        f.unmerge_adapter()
        torch.testing.assert_close(f(x), y, rtol=1e-5, atol=1e-5)
    # files both ways
    f.save_pretrained(tmp_path / "fast")
    p.unmerge_adapter()
    p.save_pretrained(tmp_path / "peft")
    from_fast, from_peft = _load(peft, base, tmp_path / "fast"), _load(fastpeft, base, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(from_fast(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_peft(x), y, rtol=1e-5, atol=1e-5)
    # merge_and_unload: plain convolutions with the merged weights
    with torch.no_grad():
        plain = f.merge_and_unload()
        assert type(plain.c2) is nn.Conv2d and type(plain.c3) is nn.Conv3d
        torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option", ["lora", "dora"])
def test_dropout_in_training_uses_peft_masks(option):
    """Same seed, same nn.Dropout calls in the same order: peft's masks, so the same training outputs and grads
    (the convolutions only: fastpeft's linear layers draw their masks in-kernel, from Philox)."""
    _, p, f = _twins({**OPTIONS[option], "lora_dropout": 0.3, "target_modules": ["c1", "c2", "c3"]})
    _random_adapters(p)
    f.load_state_dict(p.state_dict())
    x = torch.randn(2, 3, 64)
    y_train = _check_same(p, f, x, train=True)
    f.eval()
    with torch.no_grad():
        assert not torch.allclose(f(x), y_train, atol=1e-4)  # the masks did something


def test_bf16_base_fp32_adapters_like_peft():
    torch.manual_seed(0)
    base = TinyCNN().to(torch.bfloat16)
    kw = dict(r=4, lora_alpha=8, target_modules=["c1", "c2"])
    p, f = _wrap_both(base, kw)
    _random_adapters(p)
    f.load_state_dict(p.state_dict())
    layer = f.base_model.model.c2
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        yp, yf = p(x), f(x)
    assert yf.dtype == torch.bfloat16
    torch.testing.assert_close(yf, yp, rtol=1.6e-2, atol=1e-2)


def test_grouped_conv_trains_like_peft_and_refuses_merge_and_dora():
    _, p, f = _twins({"target_modules": ["c2"]}, model_kwargs={"groups": 2})
    _random_adapters(p)
    f.load_state_dict(p.state_dict())
    assert f.base_model.model.c2.lora_B["default"].weight.shape == (8, 2, 1, 1)
    _check_same(p, f, torch.randn(2, 3, 64))
    with pytest.raises(NotImplementedError, match="groups > 1"):
        f.merge_adapter()
    with pytest.raises(NotImplementedError):
        p.merge_adapter()
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="divisible by the groups"):
        fastpeft.get_peft_model(TinyCNN(groups=2), fastpeft.LoraConfig(r=3, target_modules=["c2"]))
    with pytest.raises(ValueError, match="grouped convolution"):
        fastpeft.get_peft_model(TinyCNN(groups=2), fastpeft.LoraConfig(r=4, target_modules=["c2"], use_dora=True))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("geometry", [dict(dilation=2, padding=2), dict(padding=1, padding_mode="reflect"),
                                      dict(padding="same", padding_mode="circular"), dict(stride=2, padding=0)])
def test_dilation_and_padding_modes_against_the_delta_weight(dim, geometry):
    """Where peft's lora_A ignores the base's dilation / padding mode, fastpeft's follows them, so the unmerged
    output is ``base(x) + conv(x, s·ΔW)`` with the base's geometry — the merged layer's output."""
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    torch.manual_seed(0)
    conv = cls(4, 6, 3, **geometry)
    layer = FastLoraConv(copy.deepcopy(conv), r=3, lora_alpha=6)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 4, *([7] * dim), dtype=torch.float64)
    layer.double()
    conv.double()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta = torch.einsum("or,ri...->oi...", B.flatten(1), A) * 2.0  # s·ΔW in float64, s = 6/3
    # the reference: the base convolution once with W0 and once (no bias) with s·ΔW, same geometry
    ref = conv(x) + conv._conv_forward(x, delta, None)
    y = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    layer.merge()  # (the delta is formed in fp32)
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, conv.weight, rtol=1e-6, atol=1e-7)


def test_several_adapters_active_deleted_and_mixed_batches():
    _, p, f = _twins({})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, lib in ((p, peft), (f, fastpeft)):
            model.add_adapter("other", lib.LoraConfig(r=2, lora_alpha=3, target_modules=["c2", "c3", "lin"]))
    _random_adapters(p)
    f.load_state_dict(p.state_dict())
    x = torch.randn(4, 3, 64)
    for active in (["default", "other"], "other", "default"):
        p.base_model.set_adapter(active)  # (peft's PeftModel.set_adapter takes one name; its LoraModel's a list)
        f.base_model.set_adapter(active)
        assert f.active_adapters == p.active_adapters
        _check_same(p, f, x)
    # mixed batch in eval: peft's adapter_names outputs
    names = ["other", "__base__", "default", "other"]
    p.eval()
    f.eval()
    with torch.no_grad():
        torch.testing.assert_close(f(x, adapter_names=names), p(x, adapter_names=names), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="other"):
        f(x, adapter_names=["nope"] * 4)
    # mixed batch in training: each adapter's gradient from its own samples only (the sub-batch reference)
    f.train()
    f.base_model.set_adapter(["default", "other"])
    f.zero_grad()
    f(x, adapter_names=names).square().sum().backward()
    mixed = _grads(f)
    for adapter in ("default", "other"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        f.zero_grad()
        f.set_adapter(adapter)
        f(x[rows]).square().sum().backward()
        for name, grad in _grads(f).items():
            torch.testing.assert_close(mixed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # delete: the other adapter's outputs, as peft (peft's PeftModel needs the survivor active first)
    p.set_adapter("other")
    f.set_adapter("other")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p.delete_adapter("default")
        f.delete_adapter("default")
    assert "default" not in f.base_model.model.c2.lora_A
    _check_same(p, f, x)


def test_dora_adapters_chained_and_merged_like_peft():
    _, p, f = _twins({"use_dora": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, lib in ((p, peft), (f, fastpeft)):
            model.add_adapter("b", lib.LoraConfig(r=2, lora_alpha=3, target_modules=["c1", "c2"], use_dora=True))
    _random_adapters(p)
    f.load_state_dict(p.state_dict())
    p.base_model.set_adapter(["default", "b"])
    f.base_model.set_adapter(["default", "b"])
    x = torch.randn(2, 3, 64)
    _check_same(p, f, x)
    with torch.no_grad():
        p.merge_adapter()
        f.merge_adapter()
        torch.testing.assert_close(f(x), p(x), rtol=1e-5, atol=1e-5)
        for key, value in p.state_dict().items():
            torch.testing.assert_close(f.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
        p.unmerge_adapter()
        f.unmerge_adapter()
        for key, value in p.state_dict().items():
            torch.testing.assert_close(f.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_unbatched_conv1d_input_and_disable():
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 5, 3, padding=1)
    layer = FastLoraConv(copy.deepcopy(conv), r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 10)  # (C, L): torch's unbatched form
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = conv(x) + conv._conv_forward(x, torch.einsum("or,rik->oik", B.flatten(1), A) * 2.0, None)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), conv(x))
    assert not layer.base_layer.weight.requires_grad and layer.lora_A["default"].weight.requires_grad
    assert "r=2" in repr(layer) and repr(layer).startswith("fastpeft.")


def test_bad_input_and_unsupported_inits():
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="Conv1d, nn.Conv2d or nn.Conv3d"):
        FastLoraConv(nn.ConvTranspose2d(3, 4, 3))
    with pytest.raises(ValueError, match="positive integer"):
        FastLoraConv(nn.Conv2d(3, 4, 3), r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        FastLoraConv(nn.Conv2d(3, 4, 3), lora_dropout=1.5)
    with pytest.raises(ValueError, match="True, False or 'gaussian'"):
        fastpeft.get_peft_model(TinyCNN(), fastpeft.LoraConfig(target_modules=["c2"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="not supported by fastpeft"):  # a transposed convolution as target
        model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3))
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(target_modules=["0"]))


def test_base_model_state_dict_of_a_conv_model():
    base, _, f = _twins({"use_dora": True})
    got = fastpeft.get_base_model_state_dict(f)
    want = base.state_dict()
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_weighted_adapters_like_peft_and_svd_on_convolutions():
    """linear / cat / ties / dare_linear give peft's adapter; svd (where peft fails on a convolution's 4-D delta)
    gives the best rank-k approximation of the combined delta, flattened over (out, in·kernel)."""
    _, p, f = _twins({})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, lib in ((p, peft), (f, fastpeft)):
            model.add_adapter("b", lib.LoraConfig(r=4, lora_alpha=8, target_modules=["c1", "c2", "c3", "lin"]))
    _random_adapters(p)
    f.load_state_dict(p.state_dict())
    x = torch.randn(2, 3, 64)
    for kind in ("linear", "cat", "ties", "dare_linear"):
        kw = {"density": 0.5} if kind in ("ties", "dare_linear") else {}
        outs = []
        for model in (p, f):
            torch.manual_seed(0)  # (dare draws its masks)
            model.add_weighted_adapter(["default", "b"], [0.7, 0.4], f"w_{kind}", combination_type=kind, **kw)
            model.set_adapter(f"w_{kind}")
            with torch.no_grad():
                outs.append(model.eval()(x))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5, msg=kind)
    f.add_weighted_adapter(["default", "b"], [0.7, 0.4], "s", combination_type="svd", svd_rank=3)
    for name in ("c1", "c2", "c3", "lin"):
        layer = f.base_model.model.get_submodule(name)
        want = (0.7 * layer.get_delta_weight("default") + 0.4 * layer.get_delta_weight("b")).double()
        U, S, Vh = torch.linalg.svd(want.reshape(want.shape[0], -1), full_matrices=False)
        best = ((U[:, :3] * S[:3]) @ Vh[:3]).reshape(want.shape)
        torch.testing.assert_close(layer.get_delta_weight("s").double(), best, rtol=1e-5, atol=1e-6, msg=name)


def test_hotswap_onto_convolutions_pads_ranks_and_matches_peft(tmp_path):
    """A compiled-hotswap-prepared model swaps in an adapter of another rank and alpha that skips one conv; the
    result is peft's model with that adapter."""
    base, p, f = _twins({})
    _random_adapters(p)
    f.load_state_dict(p.state_dict())
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=5, target_modules=["c1", "c2",
                                                                                                         "lin"]))
    _random_adapters(q, seed=11)
    q.save_pretrained(tmp_path)
    fastpeft.prepare_model_for_compiled_hotswap(f, target_rank=4)
    assert f.base_model.model.c2.lora_B["default"].weight.shape == (8, 4, 1, 1)
    fastpeft.hotswap_adapter(f, tmp_path, adapter_name="default")
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(f.eval()(x), q.eval()(x), rtol=1e-5, atol=1e-6)
    assert f.base_model.model.c2.lora_B["default"].weight.shape == (8, 4, 1, 1)  # padded, not replaced
    _, _, grouped = _twins({"target_modules": ["c2"]}, model_kwargs={"groups": 2})
    with pytest.raises(ValueError, match="grouped convolution"):
        fastpeft.prepare_model_for_compiled_hotswap(grouped, target_rank=8)


def test_transformers_resnet_trains_like_peft(tmp_path):
    """A transformers image classifier (ResNet: every convolution named ``convolution``) with LoRA on its convolutions
    and a trained head (modules_to_save): a few optimizer steps give peft's weights and losses; the saved adapter
    loads into peft."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=3, layer_type="bottleneck")
    torch.manual_seed(0)
    base = transformers.ResNetForImageClassification(config)
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["convolution"], modules_to_save=["classifier"])
    p, f = _wrap_both(base, kw, seed=1)
    assert sum(isinstance(m, FastLoraConv) for m in f.modules()) == 8
    assert sorted(n for n, q in p.named_parameters() if q.requires_grad) == \
        sorted(n for n, q in f.named_parameters() if q.requires_grad)
    f.load_state_dict(p.state_dict())
    g = torch.Generator().manual_seed(2)
    pixels, labels = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 2, 1, 2])
    opts = [torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-2) for m in (p, f)]
    for step in range(3):
        losses = []
        for model, opt in zip((p, f), opts):
            model.train()
            torch.manual_seed(10 + step)  # the same dropout masks (nn.Dropout in both, same call order)
            loss = model(pixel_values=pixels, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
    fs = f.state_dict()
    for key, value in p.state_dict().items():
        torch.testing.assert_close(fs[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # (BatchNorm's running statistics moved in training: they are the base's, in neither library's adapter file,
    # so both files are loaded onto the untouched base)
    f.save_pretrained(tmp_path / "fast")
    p.save_pretrained(tmp_path / "peft")
    from_fast, from_peft = _load(peft, base, tmp_path / "fast"), _load(peft, base, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(from_fast(pixel_values=pixels).logits, from_peft(pixel_values=pixels).logits,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("option", ["lora", "dora"])
def test_gpu_bf16_convolutions_match_peft(option):
    """On a GPU (cuDNN, bf16 base, fp32 adapters; the linear head through the compiled kernels): peft's outputs and
    gradients within bf16 rounding."""
    torch.manual_seed(0)
    base = TinyCNN().to("cuda", torch.bfloat16)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["c1", "c2", "c3", "lin"], **OPTIONS[option]}
    p, f = _wrap_both(base, kw)
    _random_adapters(p)
    f.load_state_dict(p.state_dict())
    x = torch.randn(8, 3, 64, device="cuda", dtype=torch.bfloat16)
    yp, yf = p(x), f(x)
    assert yf.dtype == torch.bfloat16
    torch.testing.assert_close(yf.float(), yp.float(), rtol=2e-2, atol=2e-2)
    yp.float().square().sum().backward()
    yf.float().square().sum().backward()
    fp = dict(f.named_parameters())
    for name, param in p.named_parameters():
        if param.requires_grad:
            ref = param.grad.float()
            assert (fp[name].grad.float() - ref).norm() <= 3e-2 * ref.norm() + 1e-4, name


def test_cat_of_adapters_on_a_grouped_convolution_equals_both_active():
    """combination_type="cat" on a grouped base interleaves A's rows per group (lora_B's columns are each group's
    own), so the new adapter computes both adapters' sum; peft concatenates A whole, which mixes the groups."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2))
    x = torch.randn(2, 4, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
        model.add_adapter("b", fastpeft.LoraConfig(r=2, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    model.eval()
    model.base_model.set_adapter(["default", "b"])
    with torch.no_grad():
        both = model(x)
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "cat", combination_type="cat")
        model.set_adapter("cat")
        torch.testing.assert_close(model(x), both, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_deleting_a_merged_adapter_leaves_the_others_merged(use_dora):
    """Delete one of two merged adapters: the base then holds the other one merged, exactly as merging it alone."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = FastLoraConv.from_conv(copy.deepcopy(conv), r=2, lora_alpha=4, init_lora_weights=False, use_dora=use_dora)
    layer.update_layer("b", r=3, lora_alpha=3, init_lora_weights=False, use_dora=use_dora)
    alone = FastLoraConv.from_conv(copy.deepcopy(conv), r=2, lora_alpha=4, init_lora_weights=False, use_dora=use_dora)
    alone.update_layer("b", r=3, lora_alpha=3, init_lora_weights=False, use_dora=use_dora)
    alone.load_state_dict(layer.state_dict())
    layer.merge(adapter_names=["default", "b"])
    layer.delete_adapter("default")
    assert layer.merged_adapters == ["b"] and "default" not in layer.lora_A
    alone.merge(adapter_names=["b"])
    torch.testing.assert_close(layer.base_layer.weight, alone.base_layer.weight, rtol=1e-5, atol=1e-6)
