"""LoRA configs written for transformers 4's MoE layers, on transformers 5's fused experts — peft 0.21's conversion.

transformers 5 stores the experts of Mixtral-style and Qwen2-MoE-style models (Qwen3-MoE, DeepSeek-V2/V3, OLMoE,
GLM-4-MoE, …: every model type transformers maps to those two checkpoint-conversion patterns) as stacked
parameters (``experts.gate_up_proj`` (E, 2·I, H), ``experts.down_proj``), and the router as a custom module with a
``weight``, where transformers 4 had one ``nn.Linear`` per expert projection and a linear router. peft 0.21
rewrites a LoRA config for such a model when it injects it, so that a config naming the v4 layers (a list with
``w1``/``w2``/``w3`` or ``gate_proj``/``up_proj``/``down_proj`` and ``gate``, a regex, or ``"all-linear"``, which
matched all of them in v4) targets their v5 parameters instead, through ``target_parameters``:

- ``gate`` → ``gate.weight``; ``w2`` / ``down_proj`` → ``down_proj``; ``w1`` + ``w3`` / ``gate_proj`` + ``up_proj``
  → ``gate_up_proj``, with ``rank_pattern`` and ``alpha_pattern`` ``.*\\.gate_up_proj`` at twice ``r`` and
  ``lora_alpha`` (the two fused projections keep their rank and scale each); naming one of a fused pair alone
  raises.
- Those names leave ``target_modules``, so a dense MLP or a shared expert with layers of the same names is not
  adapted (peft's behaviour, kept so that the same config gives the same adapter in both libraries). A regex
  naming a v4 layer becomes the list of last names of what it matches, as in peft.

fastpeft applies the same rewrite at the same moment (``LoraModel.inject_adapter``), so configs, trainable
parameters and saved files match peft's. The name tables are peft's (facts of the two architectures); which
model types they cover comes from transformers' own ``conversion_mapping``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

# v4 layer name → v5 parameter, per transformers checkpoint-conversion pattern
_TARGETS = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
# v5 parameters that fuse several v4 layers (in their order)
_FUSED = {"mixtral": {"gate_up_proj": ("w1", "w3")}, "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")}}


def conversion_pattern(model: nn.Module) -> str | None:
    """The transformers-5 MoE pattern (``"mixtral"`` or ``"qwen2_moe"``) whose v4 names configs for ``model`` are
    rewritten from, or None (not a transformers 5 model of such a type)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        return None
    try:
        import transformers
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4, or none
        return None
    if int(transformers.__version__.split(".")[0]) < 5 or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    pattern = "mixtral" if model_type == "mixtral" else _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    return pattern if pattern in _TARGETS else None


def _leaf_names(model: nn.Module, regex: str, mapping: dict[str, str], excluded: Callable[[str], bool]) -> set[str]:
    """The last name of every module or parameter key ``regex`` matches in full, and the v4 layer names it would
    have matched inside each stacked-expert parameter's container; keys ``excluded`` (``exclude_modules``) do not
    count, as in peft."""
    def hit(key: str) -> bool:
        return re.fullmatch(regex, key) is not None and not excluded(key)

    keys = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    found = {key.rsplit(".", 1)[-1] for key in keys if hit(key)}
    containers: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        container, _, leaf = name.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old, new in mapping.items():
        if old not in found and any(hit(f"{c}.{old}") for c in containers.get(new, ())):
            found.add(old)
    return found


def convert_config(config, model: nn.Module, all_linear_names: Callable[[], Iterable[str]],
                   excluded: Callable[[str], bool] = lambda key: False) -> None:
    """Rewrite ``config`` (a LoraConfig, in place) for ``model`` as peft 0.21 does on transformers 5 (see the
    module); nothing for other models. ``all_linear_names``: the layer names ``"all-linear"`` stands for;
    ``excluded``: whether ``exclude_modules`` names a key."""
    pattern = conversion_pattern(model)
    if pattern is None:
        return
    mapping, fused = _TARGETS[pattern], _FUSED[pattern]
    targets = config.target_modules
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            resolved = {n.rsplit(".", 1)[-1] for n in all_linear_names()} | set(mapping)
        else:
            resolved = _leaf_names(model, targets, mapping, excluded)
        if not resolved:
            return  # nothing matches: the usual "not found" error follows
        targets = resolved
    targets = set(targets or ())
    parameters = set(config.target_parameters or ())
    kept, present = set(), {new: set() for new in fused}
    for target in targets:
        old = next((o for o in mapping if target == o or target.endswith(f".{o}")), None)
        if old is None:
            kept.add(target)
            continue
        parameters.add(mapping[old])
        if mapping[old] in fused:
            present[mapping[old]].add(old)
    if kept == targets:
        # No v4 name: the config stays as written. (peft turns a regex into the last names of what it matches
        # even then, which can widen it, e.g. a regex for one layer's q_proj into every q_proj; fastpeft keeps it.)
        return
    for new, olds in fused.items():
        got = present[new]
        if 0 < len(got) < len(olds):
            raise ValueError(f"Cannot convert PEFT target(s) {', '.join(sorted(got))} without also targeting "
                             f"{', '.join(sorted(set(olds) - got))} because they are fused into {new}.")
        if len(got) == len(olds):
            config.rank_pattern = {**(config.rank_pattern or {}), rf".*\.{re.escape(new)}": config.r * len(olds)}
            config.alpha_pattern = {**(config.alpha_pattern or {}),
                                    rf".*\.{re.escape(new)}": config.lora_alpha * len(olds)}
    config.target_parameters = sorted(parameters)
    config.target_modules = sorted(kept)


_V4_EXPERT_KEY = re.compile(
    r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<layer>[A-Za-z0-9_]+)\.lora_(?P<kind>[AB])\.weight$")
_V4_BLOCK = "block_sparse_moe"  # Mixtral's MoE block in transformers 4 (``mlp`` in 5)


def convert_v4_state_dict(peft_model: nn.Module, saved: dict, adapter_name: str) -> dict:
    """A LoRA adapter file saved for transformers 4's per-expert layers (``<block>.experts.<e>.w1.lora_A.weight``
    …, Mixtral's ``block_sparse_moe``) in transformers 5's layout, for ``peft_model`` whose config went through
    :func:`convert_config`: per MoE block the experts' factors stacked into the ``target_parameters`` wrappers
    (``lora_A`` (E·r, in) expert-major, ``lora_B`` (out, r·E) rank-major), the fused gate/up pair as one rank-2r
    adapter (``A_e = [A_gate; A_up]``, ``B_e = diag(B_gate, B_up)``: each projection keeps its own delta), and the
    router's factors moved to the v5 block's ``gate``. Anything else (and any file for other models, or already in
    the v5 layout) is returned as it is; the strict loader then names what does not fit."""
    pattern = conversion_pattern(getattr(peft_model, "get_base_model", lambda: peft_model)())
    if pattern is None:
        return saved
    mapping, fused = _TARGETS[pattern], _FUSED[pattern]
    found: dict[tuple[str, str], dict[int, dict[str, object]]] = {}
    out = {}  # everything but the experts' v4 factors
    for key, value in saved.items():
        m = _V4_EXPERT_KEY.match(key)
        if not (m and m["layer"] in mapping):
            out[key] = value
        elif mapping[m["layer"]] != "gate.weight":
            slot = found.setdefault((m["block"], mapping[m["layer"]]), {}).setdefault(int(m["expert"]), {})
            slot[f"{m['layer']}.{m['kind']}"] = value
    if not found:
        return saved
    from .layers.param import FastLoraParamWrapper
    from .model import _strip_base_layer

    wrappers, modules, lora_layers = {}, set(), set()
    for name, module in peft_model.named_modules():
        modules.add(name)
        if isinstance(module, FastLoraParamWrapper) and adapter_name in module.lora_A:
            wrappers[(_strip_base_layer(name), module.parameter_name)] = name
        if adapter_name in getattr(module, "lora_A", ()):
            lora_layers.add(name)

    def v5_block(block: str) -> str:
        if block in modules or not block.endswith(f".{_V4_BLOCK}"):
            return block
        return block[: -len(_V4_BLOCK)] + "mlp"

    for (block, param), experts in found.items():
        where = wrappers.get((f"{v5_block(block)}.experts", param))
        if where is None:
            raise ValueError(f"the adapter holds transformers-4 expert factors of {block}.experts ({param}), but the "
                             "model has no LoRA on that parameter")
        olds = fused.get(param) or tuple(o for o, n in mapping.items() if n == param)
        count = max(experts) + 1
        if sorted(experts) != list(range(count)) or any(f"{o}.{k}" not in experts[e] for e in experts
                                                         for o in olds for k in "AB"):
            raise ValueError(f"the adapter's transformers-4 expert factors of {block}.experts are incomplete: "
                             f"each of experts 0..{count - 1} needs {', '.join(olds)} lora_A and lora_B")
        A = [torch.cat([experts[e][f"{o}.A"] for o in olds]) for e in range(count)]  # (r·k, in) each
        B = [torch.block_diag(*[experts[e][f"{o}.B"] for o in olds]) for e in range(count)]  # (out, r·k) each
        out[f"{where}.lora_A.weight"] = torch.cat(A)
        out[f"{where}.lora_B.weight"] = torch.stack(B, dim=-1).flatten(1)  # (out, r·k, E) rank-major
    # v4 factors of layers with those names outside the experts (a dense MLP, shared experts): the rewrite took the
    # names out of target_modules, so these layers carry no LoRA; peft drops their factors silently
    dropped = [k for k in out if (m := re.match(r"^(?P<layer>.+)\.lora_[AB]\.weight$", k))
               and mapping.get(m["layer"].rsplit(".", 1)[-1], "gate.weight") != "gate.weight"
               and m["layer"] not in lora_layers]
    if dropped:
        layers = sorted({k.rsplit(".lora_", 1)[0] for k in dropped})
        warnings.warn(f"the adapter was saved on transformers 4: its factors of {len(layers)} layer(s) outside the "
                      f"MoE experts named like expert projections (e.g. {layers[:2]}) are not loaded, as peft does "
                      "not load them: on transformers 5 those names mean the experts' parameters", stacklevel=3)
        for key in dropped:
            del out[key]
    for key in list(out):  # the v4 router (a linear ``gate``) of a renamed block
        m = re.match(rf"^(?P<block>.+\.{_V4_BLOCK})\.gate\.(?P<rest>lora_[AB]\.weight)$", key)
        if m and m["block"] not in modules:
            out[f"{v5_block(m['block'])}.gate.{m['rest']}"] = out.pop(key)
    return out


__all__ = ["conversion_pattern", "convert_config", "convert_v4_state_dict"]
