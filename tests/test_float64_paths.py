"""A float64 model stays float64 beyond the fused forward: merges, unmerges, deltas and DoRA norms/magnitudes of
embedding, conv and linear LoRA layers equal peft's (which computes them in float64) to float64 accuracy, and
gradcheck passes on a DoRA conv layer. (They were computed in fp32: merged weights 1e-7 off peft's, a merge +
unmerge changed the base by 1e-7, DoRA conv gradcheck failed.)"""

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import FastLoraConv

peft = pytest.importorskip("peft")


class _M(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.conv, self.lin = nn.Embedding(20, 8), nn.Conv1d(8, 8, 3, padding=1), nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(self.conv(self.emb(x).transpose(1, 2)).transpose(1, 2))


def _pair(dora: bool, copy_state: bool = True):
    targets = ["conv", "lin"] + ([] if dora else ["emb"])
    out = []
    for lib in (peft, fastpeft):
        torch.manual_seed(0)
        base = _M().double()
        torch.manual_seed(1)
        out.append(lib.get_peft_model(base, lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                           use_dora=dora)))
    theirs, ours = out
    if copy_state:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "lora_" in n:
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        ours.load_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize("dora", [False, True])
def test_float64_merge_and_unmerge_match_peft(dora):
    theirs, ours = _pair(dora)
    torch.manual_seed(0)
    fresh = _M().double()
    original = {n: getattr(fresh, n).weight.clone() for n in ("emb", "conv", "lin")}
    x = torch.randint(0, 20, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-13, atol=1e-13)
        theirs.merge_adapter()
        ours.merge_adapter()
        layers = [n for n in ("emb", "conv", "lin") if hasattr(getattr(ours.base_model.model, n), "base_layer")]
        for n in layers:
            w_o = getattr(ours.base_model.model, n).base_layer.weight
            w_p = getattr(theirs.base_model.model, n).base_layer.weight
            assert w_o.dtype == torch.float64 and (w_o - original[n]).abs().max() > 1e-3
            torch.testing.assert_close(w_o, w_p, rtol=1e-13, atol=1e-13)
        ours.unmerge_adapter()
        for n in layers:
            torch.testing.assert_close(getattr(ours.base_model.model, n).base_layer.weight, original[n],
                                       rtol=0, atol=1e-14)


def test_float64_dora_magnitude_init_matches_peft():
    theirs, ours = _pair(True, copy_state=False)
    for n in ("conv", "lin"):
        torch.testing.assert_close(getattr(ours.base_model.model, n).lora_magnitude_vector["default"].weight,
                                   getattr(theirs.base_model.model, n).lora_magnitude_vector["default"].weight,
                                   rtol=1e-13, atol=1e-14)


def test_float64_dora_conv_gradcheck():
    torch.manual_seed(0)
    conv = FastLoraConv(nn.Conv1d(3, 4, 3, padding=1, dtype=torch.float64), r=2, lora_alpha=4, use_dora=True).eval()
    with torch.no_grad():
        conv.lora_B["default"].weight.normal_()
        conv.lora_magnitude_vector["default"].weight.mul_(1.3)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (x,))
