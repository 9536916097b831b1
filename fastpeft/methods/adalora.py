"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form with importance-based rank allocation, in plain PyTorch.

A targeted linear layer gets ``ΔW = B · diag(E) · A`` scaled by ``lora_alpha / (ranknum + 1e-5)`` (``ranknum`` is
the initial rank, a frozen parameter), with parameters named as peft names them (``lora_A.<adapter>`` (r, in),
``lora_E.<adapter>`` (r, 1), ``lora_B.<adapter>`` (out, r), ``ranknum.<adapter>``). While training,
:meth:`AdaLoraPeftModel.update_and_allocate` keeps exponential moving averages of each entry's sensitivity
``|p · ∂L/∂p|`` and of its uncertainty, scores each singular triplet (E_i, row i of A, column i of B), and zeroes the
lowest-scoring ``E_i`` so that the total rank follows a cubic schedule from ``init_r`` per matrix down to
``target_r`` per matrix. The resulting ``rank_pattern`` is written to ``adapter_config.json`` and the saved tensors
keep only the surviving ranks — peft's format, so peft loads the adapter with the same outputs.
"""

from __future__ import annotations

import contextvars

import torch
from torch import nn

from .base import (
    AdapterLayer,
    MethodPeftModel,
    MethodTuner,
    is_conv1d,
    layer_index_ok,
    linear_features,
)
from .configs import AdaLoraConfig

# peft's defaults (TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING) for common model types.
ADALORA_TARGETS = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "roberta": ["query", "key", "value", "dense"],
    "gpt_bigcode": ["c_attn"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
}


class SVDLinear(AdapterLayer):
    """An ``nn.Linear`` / ``Conv1D`` plus an SVD-form LoRA update (peft's ``SVDLinear`` parameter layout)."""

    adapter_param_names = ("lora_A", "lora_B", "lora_E", "ranknum")
    fixed_param_names = ("ranknum",)  # never trains (get_layer_status leaves it out, as peft)

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, init_r: int, config: AdaLoraConfig):
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        dev = base_layer.weight.device
        # peft's draws, in its order and on the CPU's generator (then moved): A, E, B, and one for ranknum (then
        # set to the rank), so that a seed gives peft's factors and leaves the random stream where peft leaves it
        A, E, B = torch.randn(r, self.in_features), torch.randn(r, 1), torch.randn(self.out_features, r)
        ranknum = torch.randn(1).fill_(float(init_r))
        self.lora_A = nn.ParameterDict({adapter_name: nn.Parameter(A.to(dev))})
        self.lora_E = nn.ParameterDict({adapter_name: nn.Parameter(E.to(dev))})
        self.lora_B = nn.ParameterDict({adapter_name: nn.Parameter(B.to(dev))})
        self.ranknum = nn.ParameterDict({adapter_name: nn.Parameter(ranknum.to(dev), requires_grad=False)})
        self.scaling = {adapter_name: config.lora_alpha if config.lora_alpha > 0 else float(init_r)}
        self.lora_dropout = nn.ModuleDict({adapter_name: nn.Dropout(config.lora_dropout) if config.lora_dropout > 0
                                           else nn.Identity()})
        if config.init_lora_weights:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E[adapter_name])
                nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)
        self.set_adapter(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Use ``adapter_name``; ``ranknum`` never trains."""
        super().set_adapter(adapter_name)
        for p in self.ranknum.values():
            p.requires_grad_(False)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """``B · (A ⊙ E) · scaling / (ranknum + 1e-5)`` in the base weight's layout."""
        delta = self.lora_B[adapter] @ (self.lora_A[adapter] * self.lora_E[adapter])
        delta = delta * self.scaling[adapter] / (self.ranknum[adapter] + 1e-5)
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self._base_forward(x, *args, **kwargs)
        if base is not None:
            return base
        result = self.base_layer(x, *args, **kwargs)
        a = self.active_adapter
        A, B, E = self.lora_A[a], self.lora_B[a], self.lora_E[a]
        xa = self.lora_dropout[a](x.to(A.dtype))
        update = (xa @ (A * E).t() @ B.t()) * self.scaling[a] / (self.ranknum[a] + 1e-5)
        # summed in the wider dtype and rounded once (peft adds the fp32 update into the output in place)
        return (result + update).to(result.dtype)

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        """Add the update into the base weight."""
        w = self.base_layer.weight
        delta = self.delta_weight(adapter_name)
        if safe_merge and not torch.isfinite(w + delta).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        w.add_(delta)

    def _unmerge_one(self, adapter_name: str) -> None:
        """Subtract the update from the base weight."""
        self.base_layer.weight.sub_(self.delta_weight(adapter_name))


def _strip_name(key: str, adapter_name: str) -> str:
    return key[: -len(adapter_name) - 1] if key.endswith("." + adapter_name) else key


class RankAllocator:
    """AdaLoRA's budget schedule and importance scores (sensitivity EMA × uncertainty EMA), as in the paper/peft."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str):
        self.config = config
        self.adapter_name = adapter_name
        self.reset_ipt()
        self.init_bgt = 0
        names = set()
        for n, p in model.named_parameters():
            if f"lora_A.{adapter_name}" in n:
                self.init_bgt += p.size(0)
                names.add(n.replace("lora_A", "%s"))
        self.name_set = sorted(names)
        self.target_bgt = config.target_r * len(self.name_set)

    def reset_ipt(self) -> None:
        """Forget the importance statistics."""
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget at ``step``, whether to mask at this step)."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * progress ** 3 + self.target_bgt)
        return budget, step % c.deltaT == 0

    def update_ipt(self, model: nn.Module) -> None:
        """Update the sensitivity and uncertainty EMAs from the current gradients."""
        b1, b2 = self.config.beta1, self.config.beta2
        for n, p in model.named_parameters():
            if "lora_" not in n or self.adapter_name not in n:
                continue
            if p.grad is None:
                raise RuntimeError(f"AdaLoRA's update_and_allocate needs gradients ({n} has none): call it after "
                                   "loss.backward() / optimizer.step() and before optimizer.zero_grad()")
            with torch.no_grad():
                ipt = (p * p.grad).abs()
                avg = self.exp_avg_ipt.get(n, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(n, torch.zeros_like(p))
                avg = b1 * avg + (1 - b1) * ipt
                self.exp_avg_unc[n] = b2 * unc + (1 - b2) * (ipt - avg).abs()
                self.exp_avg_ipt[n] = avg
                self.ipt[n] = ipt

    def _score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the lowest-scoring singular values so that ``budget`` remain; returns the kept pattern."""
        params = dict(model.named_parameters())
        triplet: dict[str, torch.Tensor] = {}
        for pattern in self.name_set:
            name_e = pattern % "lora_E"
            s_a = self._score(pattern % "lora_A").mean(dim=1)  # (r,)
            s_b = self._score(pattern % "lora_B").mean(dim=0)  # (r,)
            triplet[name_e] = self._score(name_e).view(-1) + s_a + s_b
        k = self.init_bgt - budget
        if k <= 0:
            threshold = -float("inf")
        else:
            threshold = torch.kthvalue(torch.cat(list(triplet.values())), k=k)[0].item()
        pattern_out: dict[str, list[bool]] = {}
        with torch.no_grad():
            for name_e, score in triplet.items():
                drop = score <= threshold
                params[name_e].masked_fill_(drop.view(-1, 1), 0.0)
                pattern_out[name_e] = (~drop).tolist()
        return pattern_out

    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict[str, list[bool]]) -> None:
        """Zero the singular values ``rank_pattern`` drops."""
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"lora_E.{self.adapter_name}" not in n:
                    continue
                keep = rank_pattern.get(n, rank_pattern.get(_strip_name(n, self.adapter_name)))
                if keep is not None:
                    p.masked_fill_(~torch.tensor(keep, dtype=torch.bool, device=p.device).view(-1, 1), 0.0)


_LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("fastpeft_adalora_loading", default=False)


class AdaLoraTuner(MethodTuner):
    """``base_model`` of an AdaLoRA model: :class:`SVDLinear` layers, the rank allocator, the orthogonality loss."""

    def _apply_method(self, config: AdaLoraConfig, adapter_name: str) -> None:
        if config.target_modules is None:
            config.target_modules = self.model_type_default(ADALORA_TARGETS, "target_modules", "AdaLoRA",
                                                            "target_modules")
        # a saved adapter's rank_pattern sizes the layers when it is loaded (peft's resize_modules_by_rank_pattern);
        # a new adapter starts at init_r everywhere whatever its config's rank_pattern says, as in peft
        pattern = {_strip_name(k, adapter_name): v for k, v in (config.rank_pattern or {}).items()} \
            if _LOADING.get() else {}

        def in_layers(key: str) -> bool:
            return isinstance(config.target_modules, str) or layer_index_ok(key, config.layers_to_transform,
                                                                             config.layers_pattern)

        for key, module in self.linear_targets(config, "AdaLoRA", in_layers):
            keep = pattern.get(f"{key}.lora_E")
            r = int(sum(bool(v) for v in keep)) if keep is not None else config.init_r
            self.replace_module(key, SVDLinear(module, adapter_name, r, config.init_r, config))
        if config.bias == "all":
            for n, p in self.model.named_parameters():
                if n.endswith("bias"):
                    p.requires_grad_(True)
        self.trainable_adapter_name = adapter_name
        self.rankallocator = RankAllocator(self.model, config, adapter_name)

    def _extra_saved_names(self, adapter_name: str) -> list[str]:
        if self.peft_config[adapter_name].bias != "all":
            return []
        return [f"base_model.model.{n}" for n, _ in self.model.named_parameters()
                if n.endswith("bias") and ".lora_" not in n and ".modules_to_save." not in n]

    def postprocess_saved(self, tensors: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        """Keep only the surviving ranks (``rank_pattern``) in the saved tensors, as peft saves them."""
        config = self.peft_config[adapter_name]
        if not config.rank_pattern:
            return tensors
        config.rank_pattern = {_strip_name(k, adapter_name): v for k, v in config.rank_pattern.items()}
        out = dict(tensors)
        for name_e, keep in config.rank_pattern.items():
            prefix = f"base_model.model.{name_e[: -len('.lora_E')]}"
            mask = torch.tensor(keep, dtype=torch.bool)
            for part in ("lora_E", "lora_A", "lora_B"):
                key = f"{prefix}.{part}"
                if key not in out:
                    continue
                t = out[key]
                if part == "lora_B" and t.shape[1] == mask.numel():
                    out[key] = t[:, mask.to(t.device)]
                elif part != "lora_B" and t.shape[0] == mask.numel():
                    out[key] = t[mask.to(t.device)]
        return out

    def forward(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        config = self.peft_config[self.trainable_adapter_name]
        if isinstance(loss, torch.Tensor) and config.orth_reg_weight > 0:
            reg, count = 0, 0
            for n, p in self.model.named_parameters():
                if ("lora_A" in n or "lora_B" in n) and self.trainable_adapter_name in n:
                    cov = p @ p.t() if "lora_A" in n else p.t() @ p
                    reg = reg + torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro")
                    count += 1
            if count:
                outputs.loss = loss + config.orth_reg_weight * (reg / count)
        return outputs

    def resize_to_saved(self, saved: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Before saved tensors are loaded into adapter ``adapter_name`` (``load_adapter`` onto a model built at
        ``init_r``): each layer whose saved ``lora_E`` holds fewer ranks (a finished run's pruned adapter) gets
        factors of the saved size, as peft's ``resize_modules_by_rank_pattern`` does when it loads; the rank
        allocator is then built on the new sizes (as for ``from_pretrained``)."""
        resized = False
        for key, layer in self.adapter_layers():
            e = saved.get(f"base_model.model.{key}.lora_E")
            if not isinstance(layer, SVDLinear) or e is None or adapter_name not in layer.lora_E \
                    or e.shape[0] == layer.lora_E[adapter_name].shape[0]:
                continue
            r = e.shape[0]
            for part, shape in (("lora_A", (r, layer.in_features)), ("lora_E", (r, 1)),
                                ("lora_B", (layer.out_features, r))):
                old = getattr(layer, part)[adapter_name]
                getattr(layer, part)[adapter_name] = nn.Parameter(old.new_zeros(shape), requires_grad=old.requires_grad)
            resized = True
        if resized:
            self.rankallocator = RankAllocator(self.model, self.peft_config[adapter_name], adapter_name)

    def update_and_allocate(self, global_step: int) -> None:
        """Update importance scores and apply the rank budget of ``global_step`` (peft's schedule)."""
        config = self.peft_config[self.trainable_adapter_name]
        if config.inference_mode:
            raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter (loaded with is_trainable=True)")
        end = config.total_step - config.tfinal
        alloc = self.rankallocator
        if global_step < end:
            alloc.update_ipt(self.model)
            budget, mask_now = alloc.budget_schedule(global_step)
            if mask_now:
                config.rank_pattern = alloc.mask_to_budget(self.model, budget)
        elif global_step == end:
            budget, _ = alloc.budget_schedule(global_step)
            config.rank_pattern = alloc.mask_to_budget(self.model, budget)
            alloc.reset_ipt()
        elif config.rank_pattern:
            alloc.mask_using_rank_pattern(self.model, config.rank_pattern)


class AdaLoraPeftModel(MethodPeftModel):
    """A transformers model with AdaLoRA adapters, peft's layout and saved format.

    Training loop::

        for step, batch in enumerate(loader):
            loss = model(**batch).loss          # includes orth_reg_weight · orthogonality penalty
            loss.backward()
            optimizer.step()
            model.update_and_allocate(step)     # after step(), before zero_grad(): it reads the gradients
            optimizer.zero_grad()
    """

    tuner_class = AdaLoraTuner
    needs_step_hook = True

    def _load_adapter_state(self, saved: dict[str, torch.Tensor], adapter_name: str, where: str,
                            ignore_mismatched_sizes: bool = False) -> None:
        """A pruned adapter's layers take its saved sizes first (see ``AdaLoraTuner.resize_to_saved``)."""
        self.base_model.resize_to_saved(saved, adapter_name)
        super()._load_adapter_state(saved, adapter_name, where, ignore_mismatched_sizes)

    @classmethod
    def _for_loading(cls, model: nn.Module, config, adapter_name: str) -> AdaLoraPeftModel:
        """Built to load a saved adapter: the layers take the saved ``rank_pattern``'s sizes."""
        token = _LOADING.set(True)
        try:
            return cls(model, config, adapter_name)
        finally:
            _LOADING.reset(token)

    def update_and_allocate(self, global_step: int) -> None:
        """Per-step AdaLoRA budget update; call after ``optimizer.step()`` and before ``optimizer.zero_grad()``."""
        self.base_model.update_and_allocate(global_step)
