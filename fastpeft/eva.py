"""EVA, Explained Variance Adaptation (Paischer et al. 2024, arXiv:2410.07170): peft's ``init_lora_weights="eva"``.

A data-driven LoRA init, with peft 0.21's public API and results (fastpeft's own code):

1. The inputs of every adapted linear layer are collected over a dataloader (the adapters off) and fed, batch
   by batch, to an incremental PCA (sklearn's algorithm, each step a ``torch.svd_lowrank`` with the fixed
   seed 42, as peft's, so the same data gives the same vectors). Layers that receive identical inputs (q/k/v,
   gate/up) share one estimate.
2. The loop stops once, for every layer, the right-singular vectors it needs have converged (cosine similarity
   between two successive estimates ≥ ``EvaConfig.tau``); the dataloader is cycled until then.
3. Ranks are redistributed: the budget (the sum of the layers' ranks) goes to the components with the largest
   explained-variance ratios, at most ``round(r · rho)`` per layer; a layer may end with rank 0 (then it
   is not adapted at all).
4. ``lora_A`` = the top right-singular vectors (divided by √singular value with ``whiten``), ``lora_B`` = 0,
   so the model's function is unchanged; ``rank_pattern``, ``alpha_pattern`` (``adjust_scaling_factors``)
   and ``target_modules`` of the config are rewritten as peft rewrites them, so the saved adapter loads in
   peft (and peft's in fastpeft).

Example::

    config = LoraConfig(r=16, target_modules="all-linear", init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
    model = fastpeft.get_peft_model(base, config)
    fastpeft.initialize_lora_eva_weights(model, dataloader)   # batches: dicts of input_ids / attention_mask / labels
    ...train...
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import LoraConfig
from .layers import FastLoraLinear

_PREFIX = "base_model.model."
_SVD_SEED = 42  # peft's IncrementalPCA(lowrank_seed=42)
_SVD_NITER = 4
_MIN_TARGETS_FOR_SUFFIXES = 20  # peft's MIN_TARGET_MODULES_FOR_OPTIMIZATION


# --------------------------------------------------------------------------- default input handling (peft's)
def forward_fn_dict(model: nn.Module, inputs: Mapping) -> Any:
    """The default ``forward_fn``: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping, peft_config: LoraConfig) -> torch.Tensor:
    """The default ``prepare_model_inputs_fn``: the (batch, position) indices of the tokens used for the SVD,
    from ``attention_mask`` (all positions without one) and, with ``eva_config.use_label_mask``, the positions
    whose ``labels`` are not ``eva_config.label_mask_value``."""
    if not isinstance(model_input, Mapping):
        raise TypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary "
                        f"(got {type(model_input).__name__}); pass prepare_model_inputs_fn=None or your own function")
    if "input_ids" not in model_input and "attention_mask" not in model_input:
        raise KeyError("prepare_model_inputs_fn_language_modeling needs `input_ids` or `attention_mask` in the "
                       f"batch (got keys {sorted(model_input)}); pass prepare_model_inputs_fn=None or your own")
    mask = model_input.get("attention_mask")
    mask = torch.ones_like(model_input["input_ids"]).bool() if mask is None else mask.bool()
    eva = peft_config.eva_config
    if eva is not None and eva.use_label_mask and "labels" in model_input:
        mask = torch.logical_and(mask, model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def _first_tensor(layer_input, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)) and layer_input:
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer "
                        f"{layer_name}, please provide a custom prepare_layer_inputs_fn")
    return layer_input


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input: torch.Tensor,
                                              layer_name: str) -> torch.Tensor:
    """The default ``prepare_layer_inputs_fn``: the rows of the layer's input (batch, seq, features) at the
    indices ``prepare_model_inputs_fn_language_modeling`` returned, as a 2-D (tokens, features) tensor."""
    x = _first_tensor(layer_input, layer_name)
    return x[model_input.T.unbind()]


def _prepare_layer_inputs_default(layer_input, model_input, layer_name: str) -> torch.Tensor:
    """Without a ``prepare_layer_inputs_fn``: the layer's input, all but its last dimension flattened."""
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.size(-1)) if x.ndim > 2 else x


# --------------------------------------------------------------------------- incremental PCA
class _IncrementalSVD:
    """sklearn's IncrementalPCA (``partial_fit`` only), each step a seeded ``torch.svd_lowrank`` (q = 2k,
    4 iterations), with the dtypes peft's version computes in (float64 statistics): ``components_`` (k, F),
    ``singular_values_``, ``explained_variance_ratio_``."""

    def __init__(self, n_components: int):
        self.k = n_components
        self.q = 2 * n_components
        self.components_: torch.Tensor | None = None
        self.singular_values_: torch.Tensor | None = None
        self.explained_variance_ratio_: torch.Tensor | None = None
        self.mean_ = self.var_ = None
        self.n_seen = None

    def _moments(self, X: torch.Tensor):
        """Running mean, variance and count after the batch ``X`` (Chan et al.'s update, float64 sums)."""
        n_new = torch.tensor([X.shape[0]], device=X.device)
        total = n_new if self.n_seen is None else self.n_seen + n_new
        batch_sum = X.sum(dim=0, dtype=torch.float64)
        old_sum = None if self.mean_ is None else self.mean_ * self.n_seen
        mean = (batch_sum if old_sum is None else old_sum + batch_sum) / total
        centered = X - batch_sum / n_new
        correction = centered.sum(dim=0, dtype=torch.float64).square()
        batch_ssd = centered.square().sum(dim=0, dtype=torch.float64) - correction / n_new
        if self.var_ is None:
            var = batch_ssd / total
        else:
            ratio = self.n_seen.double() / n_new
            var = (self.var_ * self.n_seen + batch_ssd
                   + ratio / total * (old_sum / ratio - batch_sum).square()) / total
        return mean, var, total

    def partial_fit(self, X: torch.Tensor) -> None:
        """One incremental step on the (samples, features) batch ``X`` (fp32 or fp64; not modified)."""
        if X.dtype not in (torch.float32, torch.float64):
            X = X.float()
        n = X.shape[0]
        mean, var, total = self._moments(X)
        if self.components_ is None:
            X = X.clone()
            X -= mean  # (in X's own dtype, as sklearn and peft centre the first batch)
        else:
            batch_mean = X.mean(dim=0)
            factor = torch.sqrt(self.n_seen.double() / total * n)
            X = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, X - batch_mean,
                              factor * (self.mean_ - batch_mean)))
        with torch.random.fork_rng():
            torch.manual_seed(_SVD_SEED)
            _, S, V = torch.svd_lowrank(X, q=self.q, niter=_SVD_NITER)
        Vt = V.mH
        # sign convention (sklearn's svd_flip on V): each row's largest-magnitude entry is positive
        rows = torch.arange(Vt.shape[0], device=Vt.device)
        Vt = Vt * torch.sign(Vt[rows, Vt.abs().argmax(dim=1)]).view(-1, 1)
        self.n_seen = total
        self.components_ = Vt[: self.k]
        self.singular_values_ = S[: self.k]
        self.explained_variance_ratio_ = (S**2 / torch.sum(var * total))[: self.k]
        self.mean_, self.var_ = mean, var


# --------------------------------------------------------------------------- forward hooks
class _Hook:
    """Forward hook base: turns a layer's input into the 2-D rows the SVD sees (gathered across ranks when
    torch.distributed runs and ``gather``)."""

    def __init__(self, name: str, prepare_fn: Callable | None, gather: bool):
        self.name = name
        self.prepare_fn = prepare_fn or _prepare_layer_inputs_default
        self.gather = gather
        self.model_input = None

    @torch.no_grad()
    def rows(self, layer_input) -> torch.Tensor:
        x = self.prepare_fn(layer_input, self.model_input, self.name)
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ValueError(f"prepare_layer_inputs_fn must return a 2-D tensor (tokens, features) for layer "
                             f"{self.name}, got {getattr(x, 'shape', type(x).__name__)}")
        if self.gather and dist.is_available() and dist.is_initialized():
            x = _all_gather_rows(x)
        return x


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank stacked along the rows (ranks may hold different numbers of rows)."""
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = torch.empty(world, dtype=size.dtype, device=x.device)
    dist.all_gather_into_tensor(sizes, size)
    sizes = sizes.tolist()
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


class _DigestHook(_Hook):
    """Records a digest of the layer's input rows (to find layers that see identical inputs)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.digest = None

    @torch.no_grad()
    def __call__(self, module, args, output):
        if self.digest is None:
            x = self.rows(args).detach().contiguous().cpu()
            h = hashlib.sha256(f"{tuple(x.shape)}{x.dtype}".encode())
            h.update(x.view(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
            self.digest = h.hexdigest()


class _SVDHook(_Hook):
    """Feeds the layer's input rows to an incremental SVD and tracks which components have converged."""

    def __init__(self, n_components: int, tau: float, *args):
        super().__init__(*args)
        self.k = n_components
        self.tau = tau
        self.svd = _IncrementalSVD(n_components)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)
        self.skipped = 0

    @torch.no_grad()
    def __call__(self, module, args, output):
        previous = None if self.svd.components_ is None else self.svd.components_.clone()
        x = self.rows(args)
        if self.k > x.size(1):
            raise ValueError(f"EVA needs {self.k} components (round(r * rho)) for layer {self.name} but its input has "
                             f"only {x.size(1)} features; lower r or rho")
        if x.size(0) < self.k:  # (peft prints this and goes on to the next batch)
            self.skipped += 1
            return
        self.svd.partial_fit(x.to(torch.float32))
        if previous is None:
            return
        self.converged = nn.functional.cosine_similarity(self.svd.components_, previous) >= self.tau


# --------------------------------------------------------------------------- helpers
def _device_of(model: nn.Module) -> torch.device | None:
    devices = list({p.device for p in model.parameters() if p.device.type != "meta"})
    if len(devices) > 1:
        warnings.warn(f"Could not determine device, model has multiple devices: {devices}", stacklevel=3)
        return None
    return devices[0] if devices else None


def _to_device(inputs, device):
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    warnings.warn(f"input of type {type(inputs)} could not be moved to the correct device", stacklevel=3)
    return inputs


def _pattern_value(patterns: Mapping, name: str, default):
    """peft's ``get_pattern_key`` lookup: the first key that matches the end of ``name`` at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def _eva_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, FastLoraLinear]]:
    """(name, layer) of the fastpeft LoRA linear layers (dense and 4-bit) holding ``adapter_name``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FastLoraLinear) and adapter_name in m.lora_A]


def _base_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """For a model without adapters: the linear layers ``get_peft_model(model, config)`` would adapt."""
    from .layers.lora import _is_conv1d
    from .model import _excluded, _in_modules_to_save, _is_linear4bit, _resolve_targets, _targeted

    targets = _resolve_targets(model, config)
    mts = list(config.modules_to_save or [])
    names = []
    for name, module in model.named_modules():
        if not name or not (isinstance(module, nn.Linear) or _is_conv1d(module) or _is_linear4bit(module)):
            continue
        if _targeted(config, targets, name) and not _excluded(config, name) and not _in_modules_to_save(mts, name):
            names.append(name)
    return names


@contextmanager
def _adapters_off(model: nn.Module):
    """The model's adapters switched off inside the block (``disable_adapter()`` where the model has it)."""
    if callable(getattr(model, "disable_adapter", None)):
        with model.disable_adapter():
            yield
        return
    layers = [m for m in model.modules() if hasattr(m, "enable_adapters") and hasattr(m, "disable_adapters")]
    before = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, off in zip(layers, before):
            m.enable_adapters(not off)


def _check_prepare_layer_inputs_fn(fn, names: list[str]):
    if isinstance(fn, Mapping):
        unknown = sorted(set(fn) - set(names))
        if unknown:
            raise ValueError("prepare_layer_inputs_fn is a mapping but the following module names were not found "
                             f"in the model: {unknown} (EVA layers: {names})")
        return lambda name: fn.get(name)
    if fn is not None and not callable(fn):
        raise TypeError(f"prepare_layer_inputs_fn must be a callable, a dict of callables by layer name, or None; "
                        f"got {type(fn).__name__}")
    return lambda name: fn


# --------------------------------------------------------------------------- the SVD over a dataloader
def _collect(model: nn.Module, dataloader: Iterable, config: LoraConfig, names: list[str], forward_fn: Callable,
             prepare_model_inputs_fn: Callable | None, prepare_layer_inputs_fn, gather: bool,
             show_progress_bar: bool) -> dict[str, torch.Tensor]:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"EVA needs a fastpeft LoraConfig, got {type(config).__name__}")
    eva = config.eva_config
    if eva is None:
        raise ValueError("the LoraConfig has no eva_config; use LoraConfig(init_lora_weights='eva', "
                         "eva_config=EvaConfig(...))")
    try:
        n_batches = len(dataloader)
    except TypeError:
        raise TypeError(f"the dataloader must have a length (a DataLoader or a list of batches), got "
                        f"{type(dataloader).__name__}") from None
    if n_batches == 0:
        raise ValueError("dataloader is empty")
    if not names:
        raise ValueError("EVA found no adapted linear layer in the model (it initializes LoRA on linear layers: "
                         "nn.Linear, Conv1D, 4-bit linears)")
    if not callable(forward_fn):
        raise TypeError("forward_fn must be a callable forward_fn(model, inputs)")
    if prepare_model_inputs_fn is not None and not callable(prepare_model_inputs_fn):
        raise TypeError("prepare_model_inputs_fn must be a callable prepare_model_inputs_fn(inputs, peft_config) "
                        "or None")
    layer_fn = _check_prepare_layer_inputs_fn(prepare_layer_inputs_fn, names)
    if gather and dist.is_available() and dist.is_initialized():
        warnings.warn("torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA "
                      "initialization will gather tensors from all ranks. Ensure the model does not receive the "
                      "same inputs on different ranks.", stacklevel=3)

    rho = eva.rho
    if rho > 1000:  # peft's ceiling for very large rho
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    device = _device_of(model)

    def hook_inputs(batch):
        if device is not None:
            batch = _to_device(batch, device)
        return batch, (prepare_model_inputs_fn(batch, config) if prepare_model_inputs_fn is not None
                       else copy.deepcopy(batch))

    max_components: dict[str, int] = {}
    budget = 0
    for name in names:
        rank = _pattern_value(config.rank_pattern, name, config.r)
        max_components[name] = round(rank * rho)
        budget += rank

    training = model.training
    model.eval()
    handles: dict[str, Any] = {}
    try:
        # one batch: which layers see identical inputs (they share one SVD)
        batch, model_input = hook_inputs(next(iter(dataloader)))
        digests = {}
        for name in names:
            hook = _DigestHook(name, layer_fn(name), gather)
            hook.model_input = model_input
            digests[name] = hook
            handles[name] = model.get_submodule(name).register_forward_hook(hook)
        forward_fn(model, batch)
        for h in handles.values():
            h.remove()
        handles.clear()
        groups = defaultdict(list)
        for name, hook in digests.items():
            if hook.digest is None:
                raise ValueError(f"layer {name} was not called by forward_fn on the first batch: EVA cannot "
                                 "collect its inputs")
            groups[hook.digest].append(name)
        shared = {other: group[0] for group in groups.values() if len(group) > 1 for other in group[1:]}
        for group in groups.values():
            top = max(max_components[n] for n in group)
            for n in group:
                max_components[n] = top

        hooks: dict[str, _SVDHook] = {}
        for name in names:
            if name in shared:
                continue
            hooks[name] = _SVDHook(max_components[name], eva.tau, name, layer_fn(name), gather)
            handles[name] = model.get_submodule(name).register_forward_hook(hooks[name])
        owner = {**{n: n for n in hooks}, **shared}  # layer -> the layer whose SVD it uses

        progress = None
        if show_progress_bar and not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
            from tqdm import tqdm

            progress = tqdm(position=0, leave=False)
        done = dict.fromkeys(hooks, False)
        rank_dist = dict(max_components)
        steps = 0
        for batch in itertools.cycle(dataloader):
            batch, model_input = hook_inputs(batch)
            for name, hook in hooks.items():
                converged = bool(torch.all(hook.converged[: rank_dist[name]]))
                if not done[name] and converged:
                    handles.pop(name).remove()
                    done[name] = True
                    continue
                if done[name] and not converged:  # (a redistribution asked it for more components)
                    handles[name] = model.get_submodule(name).register_forward_hook(hook)
                    done[name] = False
                hook.model_input = model_input
            if progress is not None:
                n_done = sum(done.values()) + sum(done[o] for o in shared.values())
                progress.set_description(f"{n_done}/{len(owner)} layers have converged")
                progress.update(1)
            if all(done.values()):
                break
            forward_fn(model, batch)
            steps += 1
            if any(h.svd.components_ is None for h in hooks.values()):
                if steps >= n_batches:  # a whole pass without enough rows: it never will
                    starved = sorted(n for n, h in hooks.items() if h.svd.components_ is None)
                    raise ValueError(f"EVA: no batch gives layers {starved} at least as many rows (tokens) as the "
                                     f"components they need ({[hooks[n].k for n in starved]}); use larger batches "
                                     "or lower r / rho")
                continue
            rank_dist = _redistribute(hooks, owner, shared, budget, max_components)
        if progress is not None:
            progress.close()
    finally:
        for h in handles.values():
            h.remove()
        model.train(training)

    out = {}
    for name, rank in rank_dist.items():
        hook = hooks[owner[name]]
        if not torch.all(hook.converged[:rank]):
            raise RuntimeError(f"EVA: layer {name} has not converged but was assigned rank {rank}")
        u = hook.svd.components_[:rank]
        if eva.whiten:
            u = u / hook.svd.singular_values_[:rank].sqrt().reshape(-1, 1)
        out[name] = u.clone() if device is None else u.to(device, copy=True)
    return out


def _redistribute(hooks, owner, shared, budget, max_components) -> dict[str, int]:
    """Ranks from the explained-variance ratios: the ``budget`` largest ratios over all layers (each layer's
    first ``max_components``), a layer sharing another's inputs never ranked above the one holding the SVD."""
    ratios = {n: h.svd.explained_variance_ratio_[: max_components[n]] for n, h in hooks.items()}
    keys, values = zip(*[(layer, v) for layer, src in owner.items() for v in ratios[src]])
    order = torch.stack(values).argsort(descending=True)  # (peft's call: the same tie order)
    counts = Counter(keys[i] for i in order[:budget])
    counts = {layer: counts.get(layer, 0) for layer in owner}
    for layer, src in shared.items():
        if counts[src] < counts[layer]:
            counts[src], counts[layer] = counts[layer], counts[src]
    return counts


# --------------------------------------------------------------------------- public API
@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config: LoraConfig | None = None,
                       forward_fn: Callable | None = forward_fn_dict,
                       prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
                       prepare_layer_inputs_fn: Callable | dict[str, Callable] | None =
                       prepare_layer_inputs_fn_language_modeling,
                       adapter_name: str = "default", gather_distributed_inputs: bool = True,
                       show_progress_bar: bool = True) -> dict[str, torch.Tensor]:
    """EVA's SVD over ``dataloader``: ``{layer name: A}`` with ``A`` the (rank, in_features) top right-singular
    vectors of the layer's inputs, ranks already redistributed (peft's function of the same name).

    ``model`` is a fastpeft model (its adapter ``adapter_name`` layers; the adapters are off during the forward
    passes, names as ``model.named_modules()`` gives them) or a plain model with ``peft_config`` (the linear
    layers ``get_peft_model(model, peft_config)`` would adapt). ``forward_fn(model, batch)`` runs a batch
    (``model(**batch)``); ``prepare_model_inputs_fn(batch, peft_config)`` turns it into what
    ``prepare_layer_inputs_fn(layer_input, that, layer_name)`` (one callable, or a dict by layer name)
    needs to return the 2-D (tokens, features) rows for the SVD (defaults: the non-padding, non-masked-label
    tokens of a language-model batch; ``None``: all positions). The dataloader must have a length and is
    cycled until the vectors converge (``eva_config.tau``). ``gather_distributed_inputs``: under
    torch.distributed, the rows of all ranks are pooled. ``show_progress_bar``: tqdm, as peft's.

    Example::

        sd = fastpeft.get_eva_state_dict(base_model, dataloader, peft_config=config)
        model = fastpeft.get_peft_model(base_model, config)
        fastpeft.initialize_lora_eva_weights(model, eva_state_dict=sd)
    """
    is_peft = hasattr(model, "peft_config")
    if is_peft and peft_config is None:
        if adapter_name not in model.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found in the model (adapters: "
                             f"{sorted(model.peft_config)})")
        peft_config = model.peft_config[adapter_name]
    elif peft_config is None:
        raise ValueError("peft_config is required if model is not a PeftModel")
    if forward_fn is None:
        forward_fn = forward_fn_dict
    if is_peft:
        names = [n for n, _ in _eva_layers(model, adapter_name)]
        ctx = _adapters_off(model)
    else:
        names = _base_targets(model, peft_config)
        ctx = nullcontext()
    with ctx:
        return _collect(model, dataloader, peft_config, names, forward_fn, prepare_model_inputs_fn,
                        prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar)


@torch.no_grad()
def initialize_lora_eva_weights(model: nn.Module, dataloader: Iterable | None = None,
                                eva_state_dict: dict[str, torch.Tensor] | None = None,
                                forward_fn: Callable | None = forward_fn_dict,
                                prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
                                prepare_layer_inputs_fn: Callable | dict[str, Callable] | None =
                                prepare_layer_inputs_fn_language_modeling,
                                adapter_name: str = "default", gather_distributed_inputs: bool = True,
                                show_progress_bar: bool = True) -> None:
    """Initialize adapter ``adapter_name`` (``init_lora_weights="eva"``) of a fastpeft model with EVA, as peft's
    function of the same name: ``lora_A`` from :func:`get_eva_state_dict` over ``dataloader`` (or from a given
    ``eva_state_dict``, keys with or without the ``base_model.model.`` prefix), ``lora_B`` zero.

    A layer whose rank changed is rebuilt at its new rank (``lora_alpha`` times new/old rank with
    ``eva_config.adjust_scaling_factors``); a layer given rank 0 loses the adapter (the module goes back to its
    base layer when it holds no other adapter); adapted layers EVA does not handle (embeddings) are
    re-initialized with ``init_lora_weights=True``, with peft's warning. The config's ``rank_pattern``,
    ``alpha_pattern`` and ``target_modules`` are rewritten with the layers' full names, as peft does, so the saved
    adapter loads in peft. Other arguments: see :func:`get_eva_state_dict`. Returns None (as peft).

    Example::

        model = fastpeft.get_peft_model(base, LoraConfig(r=16, init_lora_weights="eva", target_modules="all-linear"))
        fastpeft.initialize_lora_eva_weights(model, dataloader)
    """
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel")
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} not found in the model (adapters: {sorted(model.peft_config)})")
    if len(getattr(model, "active_adapters", [adapter_name])) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
                                            adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs,
                                            show_progress_bar=show_progress_bar)
    elif dataloader is not None:
        warnings.warn("both eva_state_dict and dataloader were given: the eva_state_dict is used, the dataloader "
                      "is not read", stacklevel=2)
    _load_eva_state_dict(model, dict(eva_state_dict), adapter_name)


def _minimal_suffixes(targets: list[str], others: list[str]) -> set[str]:
    """The fewest name suffixes (shortest first) that pick out ``targets`` and none of ``others`` (peft's
    condensed ``target_modules`` for long lists)."""
    def suffixes(name):
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]

    taken_by_others = {s for o in others for s in suffixes(o)}
    chosen: set[str] = set()
    for name in sorted(set(targets), key=suffixes):
        if any(name == c or name.endswith("." + c) for c in chosen):
            continue
        for s in suffixes(name):
            if s not in taken_by_others:
                chosen.add(s)
                break
    return chosen or set(targets)


def _load_eva_state_dict(model: nn.Module, eva_state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    from .layers import FastLoraEmbedding
    from .layers.param import FastLoraParamWrapper
    from .model import parent_of

    config = model.peft_config[adapter_name]
    eva = config.eva_config
    if eva is None:
        raise ValueError("the adapter's config has no eva_config")
    lora_types = (FastLoraLinear, FastLoraEmbedding, FastLoraParamWrapper)
    all_names = [n for n, _ in model.named_modules()]
    # keys as get_eva_state_dict gives them on the PeftModel, or on the bare base model (peft needs the former)
    by_name = {}
    for key, value in eva_state_dict.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            raise ValueError(f"eva_state_dict[{key!r}] must be a 2-D (rank, in_features) tensor, got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
        name = _PREFIX + key if key not in all_names and _PREFIX + key in all_names else key
        by_name[name] = value
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lora_types) and (
        adapter_name in (m.lora_embedding_A if isinstance(m, FastLoraEmbedding) else m.lora_A))}
    eva_layers = {n for n, m in layers.items() if isinstance(m, FastLoraLinear)}
    unknown = sorted(set(by_name) - eva_layers)
    if unknown:
        raise ValueError(f"eva_state_dict has entries for {unknown}, which are not LoRA linear layers holding adapter "
                         f"{adapter_name!r} in this model")
    for name in sorted(set(by_name)):
        layer, value = layers[name], by_name[name]
        if value.shape[0] and value.shape[1] != layer.in_features:
            raise ValueError(f"eva_state_dict[{name!r}] has {value.shape[1]} columns, the layer "
                             f"{layer.in_features} input features")

    targets, missing, others = [], [], []
    rank_pattern, alpha_pattern = {}, {}
    tuner = getattr(model, "base_model", model)
    for name, module in list(model.named_modules()):
        short = name.replace(_PREFIX, "")
        if name not in layers:
            if not isinstance(module, lora_types):
                others.append(short)
            continue
        r = module.r[adapter_name]
        alpha = module.lora_alpha[adapter_name]
        if name in by_name:
            w = by_name.pop(name)
            new_rank = w.size(0)
            if new_rank == 0:
                _drop_adapter(model, tuner, name, module, adapter_name, parent_of)
                continue
            if new_rank != r and eva.adjust_scaling_factors:
                alpha *= new_rank / r
            if new_rank != r or module.lora_A[adapter_name].weight.device.type == "meta":
                cfg = copy.copy(config)
                cfg.init_lora_weights = "eva"
                module.update_layer(adapter_name, r=new_rank, lora_alpha=alpha, config=cfg)
            module.lora_A[adapter_name].weight.copy_(w)
            targets.append(short)
        else:
            cfg = copy.copy(config)
            cfg.init_lora_weights = True
            module.update_layer(adapter_name, r=r, lora_alpha=alpha, config=cfg)
            missing.append(short)
            new_rank = r
        if new_rank != config.r:
            rank_pattern[short] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[short] = alpha

    new_targets = targets + missing
    if len(new_targets) >= _MIN_TARGETS_FOR_SUFFIXES:
        new_targets = sorted(_minimal_suffixes(new_targets, others))
    config.target_modules = new_targets
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if missing:
        warnings.warn("the following layers were initialized with init_lora_weights=True because they were not "
                      f"found in the eva state_dict: {missing}\ncurrently the following lora modules are not "
                      "supported by EVA: (FastLoraEmbedding, FastLoraParamWrapper)", stacklevel=3)


def _drop_adapter(model, tuner, name, module, adapter_name, parent_of) -> None:
    """EVA gave layer ``name`` rank 0: it loses adapter ``adapter_name`` (back to its base layer if that was
    its only adapter, as peft replaces it)."""
    if len(module.lora_A) > 1:
        module.delete_adapter(adapter_name)
        return
    parent, child = parent_of(model, name)
    setattr(parent, child, module.get_base_layer())
    injected = getattr(tuner, "_injected", None)
    if isinstance(injected, list):
        short = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
        for key in (name, short):
            if key in injected:
                injected.remove(key)
