"""Conversion between Hugging Face peft models and fastpeft layers.

``from_peft`` swaps, in place, every peft LoRA layer of a ``peft.PeftModel`` for a
``FastLoraLinear`` that adopts the same parameter objects (nothing copied; DoRA's
magnitude vectors included), the adapter names and the active adapter; the peft model keeps working (save,
set_adapter, disable_adapter, merge_and_unload) with fused layers inside.
``to_peft`` goes back: peft layers on a converted peft model, or a fresh
``peft.PeftModel`` built from a fastpeft ``PeftModel``.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from .layers.lora import FastLoraLinear, _base_shape, _has_own_forward
from .layers.lora_init import mutates_base
from .model import ModulesToSaveWrapper, PeftModel, _is_linear4bit, parent_of
from .quant import Linear4bit as FastQuantLinear4bit


def _register_with_peft() -> None:
    """Let peft's model-level code (set_adapter, disable_adapter, merge_and_unload) see fastpeft layers."""
    from peft.tuners.lora import LoraLayer

    if not issubclass(FastLoraLinear, LoraLayer):
        LoraLayer.register(FastLoraLinear)  # LoraLayer is an ABC (via BaseTunerLayer): a virtual subclass


def _adopt(layer: nn.Module, path: str) -> FastLoraLinear:
    # lora_bias: peft's lora_B modules carry their bias; they are adopted as they are (FastLoraLinear reads
    # ``lora_bias`` from them)
    use_dora = {n: bool(v) for n, v in (getattr(layer, "use_dora", {}) or {}).items()}
    peft_variants = getattr(layer, "lora_variant", {}) or {}
    use_alora = {n: type(v).__name__ == "ALoraLinearVariant" for n, v in peft_variants.items()}
    mica = {n for n, v in peft_variants.items() if type(v).__name__ == "MiCALinearVariant"}
    variants = {n: v for n, v in peft_variants.items()
                if v is not None and not (use_dora.get(n) and type(v).__name__ == "DoraLinearVariant")
                and not use_alora[n] and n not in mica}
    if variants:
        raise ValueError(f"{path}: peft LoRA variant {variants} is not supported by fastpeft")
    base = layer.get_base_layer()
    if _is_linear4bit(base):
        from .layers.lora4bit import FastLoraLinear4bit

        cls = FastLoraLinear4bit
    else:
        cls = FastLoraLinear
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new._fastpeft_adapter_names = None
    new._fastpeft_alora_offsets = None
    new._init_adapter_state()
    if cls is FastLoraLinear:
        new.in_features, new.out_features, new.fan_in_fan_out = _base_shape(base)
        new._opaque_base = _has_own_forward(base)
    else:
        new._adopt_base(base)
    new.base_layer = base
    new.lora_A, new.lora_B, new.lora_dropout = layer.lora_A, layer.lora_B, layer.lora_dropout
    names = list(layer.lora_A.keys())
    new.r = {n: int(layer.r[n]) for n in names}
    new.lora_alpha = {n: layer.lora_alpha[n] for n in names}
    new.scaling = {n: float(layer.scaling[n]) for n in names}
    new.use_rslora = {n: bool(getattr(layer, "use_rslora", {}).get(n, False)) for n in names}
    new.use_dora = {n: use_dora.get(n, False) for n in names}
    new.use_alora = {n: use_alora.get(n, False) for n in names}
    # MiCA's frozen lora_B (peft's frozen_peft_weight_names, kept as they are)
    new.frozen_peft_weight_names = {n: tuple(w) for n, w in (getattr(layer, "frozen_peft_weight_names", None)
                                                             or {}).items() if n in names}
    if any(new.use_dora.values()):
        # peft's ModuleDict of DoraLinearLayer modules, adopted as is: the same magnitude parameters under the
        # same names (fastpeft reads only their ``weight``); the norms peft kept for merged DoRA adapters too
        new.lora_magnitude_vector = layer.lora_magnitude_vector
        caches = getattr(layer, "_caches", {})
        new._dora_merged_norms = {n: caches[f"{n}-weight_norm"] for n in layer.merged_adapters
                                  if f"{n}-weight_norm" in caches}
    new._active_adapters = list(layer.active_adapters)  # names this layer lacks are ignored, as in peft
    new.merged_adapters = list(layer.merged_adapters)
    new._disable_adapters = bool(layer.disable_adapters)
    new._in_peft_model = True  # peft's model code checks adapter names model-wide and calls us per layer
    new.train(layer.training)  # an eval-mode model stays in eval mode (no LoRA dropout at inference)
    return new


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Swap every peft LoRA ``Linear`` (nn.Linear, Conv1D and bitsandbytes Linear4bit bases) for fastpeft's, in place.

    Parameters are adopted, not copied; adapter names, ranks, scalings, dropout, merged state and the
    active adapter are kept. Embedding/conv LoRA layers stay peft's (with a warning: an embedding lookup has
    no fused kernel to gain, and peft's layer keeps working inside the peft model). Returns ``peft_model``.
    """
    from peft.tuners.lora import LoraLayer

    _register_with_peft()
    converted, skipped = 0, []
    for name, module in list(peft_model.named_modules()):
        if not isinstance(module, LoraLayer) or isinstance(module, FastLoraLinear):
            continue
        base = module.get_base_layer()
        if type(module).__name__ == "ParamWrapper":  # target_parameters: peft's layer stays (nothing to fuse)
            skipped.append(f"{name} (ParamWrapper of {type(base).__name__}.{module.parameter_name})")
            continue
        if not (isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D" or _is_linear4bit(base)):
            skipped.append(f"{name} ({type(base).__name__})")
            continue
        parent, child = parent_of(peft_model, name)
        setattr(parent, child, _adopt(module, name))
        converted += 1
    if skipped:
        warnings.warn(f"from_peft kept peft's layers for {skipped}: fastpeft fuses Linear/Conv1D/Linear4bit only "
                      "(peft's embedding layer has nothing to fuse and stays as it is)", stacklevel=2)
    if converted == 0:
        raise ValueError("from_peft found no peft LoRA Linear layer to convert")
    return peft_model


def _to_peft_layer(layer: FastLoraLinear) -> nn.Module:
    import peft.tuners.lora as plora

    names = list(layer.lora_A.keys())
    base = layer.base_layer
    if _is_linear4bit(base):
        from peft.tuners.lora.bnb import Linear4bit as cls
    else:
        cls = plora.Linear

    def config(n):
        drop = layer.lora_dropout[n]
        return plora.LoraConfig(r=layer.r[n], lora_alpha=layer.lora_alpha[n],
                                lora_dropout=float(getattr(drop, "p", 0.0)), use_rslora=layer.use_rslora[n],
                                init_lora_weights=False, fan_in_fan_out=layer.fan_in_fan_out,
                                use_dora=layer.use_dora.get(n, False), lora_bias=layer.lora_bias[n])

    first = names[0]
    new = cls(base, first, config=config(first), r=layer.r[first], lora_alpha=layer.lora_alpha[first])
    for n in names[1:]:
        new.update_layer(n, r=layer.r[n], lora_alpha=layer.lora_alpha[n], config=config(n))
    for n in names:
        new.lora_A[n] = layer.lora_A[n]
        new.lora_B[n] = layer.lora_B[n]
        new.lora_dropout[n] = layer.lora_dropout[n]
        new.scaling[n] = layer.scaling[n]
        if "lora_B" in layer.frozen_peft_weight_names.get(n, ()):  # MiCA: peft's variant keeps B frozen
            from peft.tuners.lora.variants import MiCALinearVariant

            new.lora_variant[n] = MiCALinearVariant()
            MiCALinearVariant.init(new, n)
        if layer.use_alora.get(n, False):  # peft's aLoRA variant (its invocation lives in the model's config)
            from peft.tuners.lora.variants import ALoraLinearVariant

            new.lora_variant[n] = ALoraLinearVariant()
        if layer.use_dora.get(n, False):  # peft's DoraLinearLayer keeps its place; the parameter is ours
            new.lora_magnitude_vector[n].weight = layer.lora_magnitude_vector[n].weight
            if n in layer._dora_merged_norms:
                new._cache_store(f"{n}-weight_norm", layer._dora_merged_norms[n])
    trainable = {id(p): p.requires_grad for p in layer.parameters()}
    new.set_adapter(layer.active_adapters)  # (peft's set_adapter makes them trainable: put back as they were)
    for p in new.parameters():
        if id(p) in trainable:
            p.requires_grad_(trainable[id(p)])
    new.merged_adapters = list(layer.merged_adapters)
    new._disable_adapters = layer.disable_adapters
    new.train(layer.training)
    return new


def to_peft(model: nn.Module) -> nn.Module:
    """A plain peft model back.

    - On a peft ``PeftModel`` converted with :func:`from_peft`: swaps the fastpeft layers back to peft's, in
      place (same parameter objects), and returns it.
    - On a fastpeft :class:`PeftModel`: builds ``peft.PeftModel`` over the same transformers model with the
      same configs and adapter weights. The fastpeft wrapper is consumed (its layers are unloaded).
    """
    if isinstance(model, PeftModel):
        return _fastpeft_to_peft(model)
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, FastLoraLinear):
            parent, child = parent_of(model, name)
            setattr(parent, child, _to_peft_layer(module))
            count += 1
    if count == 0:
        raise ValueError("to_peft found no fastpeft layer in this model")
    return model


def _fastpeft_to_peft(model: PeftModel) -> nn.Module:
    import peft
    from peft.utils import set_peft_model_state_dict

    from .config import LoraConfig
    from .save import adapter_state_dict

    # refused before anything changes: other methods (their files load in peft), merged adapters
    others = sorted({type(c).__name__ for c in model.peft_config.values() if not isinstance(c, LoraConfig)})
    if others:
        raise ValueError(f"to_peft converts LoRA models; this one holds {others}: save_pretrained it and load the "
                         "folder with peft's PeftModel.from_pretrained (the model is unchanged)")
    merged = sorted({n for _, layer in model.base_model.lora_layers() for n in getattr(layer, "merged_adapters", ())})
    if merged:
        raise ValueError(f"to_peft: adapters {merged} are merged into the base weights; unmerge_adapter() first (the "
                         "model is unchanged)")
    # fastpeft's own 4-bit layers (quantize_model) become bitsandbytes' Linear4bit over the same bytes, which peft
    # wraps; int4 has no bitsandbytes form: refused, like a missing bitsandbytes, before anything changes
    quantized = [(n, m) for n, m in model.base_model.model.named_modules() if isinstance(m, FastQuantLinear4bit)]
    int4 = [n for n, m in quantized if m.quant_type == "int4"]
    if int4:
        raise ValueError(f"to_peft: {len(int4)} layer(s) hold fastpeft's group-wise int4 weights ({int4[:3]}), which "
                         "peft cannot hold (bitsandbytes has NF4/FP4 only); the model is unchanged")
    if quantized:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError("to_peft on a model with 4-bit layers needs bitsandbytes (peft's 4-bit LoRA layers wrap "
                              "bitsandbytes.nn.Linear4bit); the model is unchanged") from err
    configs = {n: copy.deepcopy(c) for n, c in model.peft_config.items()}
    # what the model is doing, to be the same after: trainable flags, train/eval, adapters switched off
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    training = model.training
    disabled = any(getattr(layer, "disable_adapters", False) for _, layer in model.base_model.lora_layers())
    # (the base embedding weights stay where they are: the same model goes under peft's wrapper)
    states = {n: adapter_state_dict(model, n, save_embedding_layers=False) for n in configs}
    active = model.active_adapters
    # modules_to_save: the base keeps its original module (the trained copies travel in the state dicts);
    # unload() alone would put the active copy in its place, and peft would then wrap that as the original
    for key, wrapper in list(model.base_model.modules_to_save_wrappers()):
        parent, child = parent_of(model.base_model.model, key)
        setattr(parent, child, wrapper.original_module)
    base = model.unload()
    for wrapper_parent in [n for n, m in base.named_modules() if isinstance(m, ModulesToSaveWrapper)]:
        raise RuntimeError(f"unexpected modules_to_save wrapper left at {wrapper_parent}")
    for key, module in [(n, m) for n, m in base.named_modules() if isinstance(m, FastQuantLinear4bit)]:
        parent, child = parent_of(base, key)
        setattr(parent, child, module.to_bnb())  # (the same packed bytes and statistics, no copy)
    out = None
    for name, cfg in configs.items():
        d = cfg.to_dict()
        # the base already holds the residual / quantized weight: peft must not run the init again
        if mutates_base(d["init_lora_weights"]):
            d["init_lora_weights"], d["loftq_config"] = True, {}
        # layer_replication: the base's layers are replicated already; peft would replicate them again
        replication = d.pop("layer_replication", None)
        pcfg = peft.LoraConfig(**{k: v for k, v in d.items() if k not in ("peft_type",)})
        if out is None:
            out = peft.get_peft_model(base, pcfg, adapter_name=name)
        else:
            out.add_adapter(name, pcfg)
        out.peft_config[name].layer_replication = replication  # (written to adapter_config.json, as before)
        result = set_peft_model_state_dict(out, states[name], adapter_name=name)
        bad = [k for k in getattr(result, "unexpected_keys", []) if name in k or "lora_" in k]
        if bad:
            raise RuntimeError(f"peft did not accept adapter {name!r} keys {bad[:3]}")
    if len(active) > 1:  # (peft's PeftModel.set_adapter takes one name; its tuner takes a list)
        out.base_model.set_adapter(active)
    else:
        out.set_adapter(active[0])
    for n, p in out.named_parameters():
        if n in trainable:
            p.requires_grad_(trainable[n])
    out.train(training)
    if disabled:
        out.base_model.disable_adapter_layers()
    return out
