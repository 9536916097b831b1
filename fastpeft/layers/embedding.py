"""``FastLoraEmbedding``: LoRA on a frozen ``nn.Embedding``, with peft's ``lora.Embedding`` semantics and names.

Parameters are peft's: ``base_layer.weight`` (num_embeddings, embedding_dim), ``lora_embedding_A.<adapter>``
(r, num_embeddings) and ``lora_embedding_B.<adapter>`` (embedding_dim, r), plain parameters in
``ParameterDict``s (no ``.weight`` suffix), so state dicts and saved adapters move between the two libraries
unchanged. The output, for the active adapters ``a`` summed::

    base(x) + Σ_a (embedding(x, A_aᵀ) @ B_aᵀ) · scale_a   [· embed_scale, when the base has a scalar one]

where the lookup into ``A_aᵀ`` takes the base's ``padding_idx``, ``max_norm``, ``norm_type``,
``scale_grad_by_freq`` and ``sparse``, as peft passes them (the padding row of ``A_aᵀ`` gets no gradient).
As in peft, ``lora_dropout`` is kept per adapter but not applied: an embedding lookup has no input features
to drop. Initialization is peft's: ``init_lora_weights=True`` (and "gaussian", and the data-driven inits peft
falls back from on embeddings, such as "pissa") gives A = 0 and B ~ N(0, 1) — the reverse of the linear
layers, where B is the zero factor; ``False`` leaves both N(0, 1). No fused kernel: a row gather plus a
rank-r matmul is already cheap in plain PyTorch. DoRA on embeddings is refused (peft has it; fastpeft does
not match it).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import wide
from .lora_init import init_kind
from .parametrized import check_weight_writable, store_merged, store_unmerged
from .switches import AdapterSwitches, warn_already_merged

# init_lora_weights: any value the linear layers take (fastpeft.layers.lora_init); a config that asks PiSSA or
# OLoRA for its linear targets also reaches embedding targets, which peft then initializes as for True. LoftQ,
# which peft runs on embeddings too, is refused here.


def refuse_embedding_dora(where: str) -> None:
    """Raise the error for DoRA (``use_dora=True``) on an embedding layer, naming ``where``."""
    raise ValueError(f"DoRA (use_dora=True) on the embedding layer {where} is not supported by fastpeft (peft has "
                     "it through DoraEmbeddingVariant); drop the embedding from target_modules or use plain LoRA "
                     "for it (a separate adapter without use_dora)")


class FastLoraEmbedding(AdapterSwitches, nn.Module):
    """LoRA on a frozen embedding layer: ``base(x) + scale · embedding(x, Aᵀ) Bᵀ`` (peft's ``lora.Embedding``).

    Args mirror peft's ``LoraConfig``: ``r`` (rank, ≥ 1), ``lora_alpha``, ``lora_dropout`` (kept, not
    applied, as in peft), ``use_rslora`` (scale ``alpha/√r`` instead of ``alpha/r``), ``init_lora_weights``
    (True / "gaussian": A = 0, B ~ N(0, 1); False: A, B ~ N(0, 1)). Adapter weights are fp32 on a
    half-precision base unless ``autocast_adapter_dtype=False``. Output dtype is the base's.

    Example::

        layer = FastLoraEmbedding.from_embedding(model.model.embed_tokens, r=16, lora_alpha=32)
    """

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")
    fan_in_fan_out = False  # peft's attribute; the delta weight is (num_embeddings, embedding_dim) regardless

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, r: int = 8,
                 lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
                 init_lora_weights: bool | str = True, use_dora: bool = False, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, device=None, dtype=None):
        super().__init__()
        base = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self._wrap(base, adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                   use_rslora=use_rslora, init_lora_weights=init_lora_weights, use_dora=use_dora,
                   autocast_adapter_dtype=autocast_adapter_dtype)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, r: int = 8, lora_alpha: float = 8,
                       lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights: bool | str = True,
                       adapter_name: str = "default", autocast_adapter_dtype: bool = True,
                       use_dora: bool = False, loftq_config=None) -> FastLoraEmbedding:
        """Wrap an existing ``nn.Embedding`` (or a subclass, e.g. a scaled word embedding) without copying it."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._wrap(embedding, adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                   use_rslora=use_rslora, init_lora_weights=init_lora_weights, use_dora=use_dora,
                   autocast_adapter_dtype=autocast_adapter_dtype)
        return self

    # ------------------------------------------------------------------ setup
    def _wrap(self, base: nn.Module, adapter_name: str, **adapter_kwargs) -> None:
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"FastLoraEmbedding wraps nn.Embedding, got {type(base).__name__}")
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        # peft's names for the two sides (its LoraLayer reads them off the weight: in = rows, out = columns)
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        self.base_layer = base
        self._fastpeft_adapter_names = None
        for param in base.parameters():
            param.requires_grad_(False)
        self.lora_dropout = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}  # always False here (DoRA is refused); read by model-level code
        self._active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self.update_layer(adapter_name, **adapter_kwargs)

    def update_layer(self, adapter_name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False,
                     autocast_adapter_dtype: bool = True, config=None, use_dora: bool = False,
                     **peft_kwargs) -> None:
        """Add (or replace) adapter ``adapter_name``; without ``config`` it becomes the active one.

        With ``config`` (a LoraConfig) dropout, init, rsLoRA and DoRA come from it and the active adapters
        stay as they are (peft's semantics). DoRA and ``lora_bias`` are refused."""
        if getattr(config, "lora_bias", False) or peft_kwargs.get("lora_bias"):
            raise ValueError("lora_bias=True is not supported for embedding layers (nor by peft)")
        if config is not None:
            lora_dropout, init_lora_weights = config.lora_dropout, config.init_lora_weights
            use_rslora, use_dora = config.use_rslora, bool(getattr(config, "use_dora", False))
        if use_dora:
            refuse_embedding_dora(f"({type(self.base_layer).__name__}, adapter {adapter_name!r})")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r!r}")
        if not 0.0 <= float(lora_dropout) <= 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1], got {lora_dropout}")
        if init_kind(init_lora_weights)[0] == "mica":
            raise ValueError(f"init_lora_weights='mica' on an embedding layer ({type(self.base_layer).__name__}, "
                             f"adapter {adapter_name!r}) is not supported by fastpeft (peft has an embedding variant "
                             "of MiCA); leave the embeddings out of target_modules")
        if init_kind(init_lora_weights)[0] == "loftq":  # (init_kind raises on an unknown value)
            raise ValueError(f"init_lora_weights='loftq' on an embedding layer ({type(self.base_layer).__name__}, "
                             f"adapter {adapter_name!r}) is not supported by fastpeft; leave the embeddings out of "
                             "target_modules for LoftQ")
        weight = self.base_layer.weight
        dtype = weight.dtype
        if (autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16)) or not dtype.is_floating_point:
            dtype = torch.float32
        # Drawn as peft draws them (on the CPU, A then B), so the same seed gives the same factors.
        A = torch.randn((r, self.num_embeddings))
        B = torch.randn((self.embedding_dim, r))
        if init_lora_weights is not False:
            nn.init.zeros_(A)
            nn.init.normal_(B)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_embedding_A[adapter_name] = nn.Parameter(A.to(device=weight.device, dtype=dtype))
        self.lora_embedding_B[adapter_name] = nn.Parameter(B.to(device=weight.device, dtype=dtype))
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.use_dora[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self._activate_added(adapter_name, config)

    add_adapter = update_layer

    # ------------------------------------------------------------ adapters
    @property
    def padding_idx(self) -> int | None:
        """The base embedding's ``padding_idx``."""
        return self.base_layer.padding_idx

    def _adapter_names(self) -> list[str]:
        return list(self.lora_embedding_A.keys())

    def _adapter_parameters(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter_factors(name)

    def adapter_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, num_embeddings), B (embedding_dim, r)) of ``adapter_name``: the parameters themselves."""
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (unmerging it first if merged)."""
        if adapter_name not in self.lora_embedding_A:
            raise ValueError(f"unknown adapter {adapter_name!r}; this layer has {list(self.lora_embedding_A)}")
        if adapter_name in self.merged_adapters:
            self._unmerge_one(adapter_name)
        for d in (self.lora_embedding_A, self.lora_embedding_B, self.lora_dropout):
            del d[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.use_dora):
            d.pop(adapter_name, None)
        self._forget_active(adapter_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scale · (B A)ᵀ`` in fp32, shaped as the base weight (num_embeddings, embedding_dim)."""
        A, B = self.adapter_factors(adapter_name)
        return (wide(B) @ wide(A)).t() * self.scaling[adapter_name]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or the named) adapters into the base weight (in fp32, cast once); ``safe_merge``
        checks the merged weight for NaN/inf before writing it."""
        names = self._names_to_merge(adapter_names)
        warn_already_merged(self, names)  # peft's warnings
        if any(n not in self.merged_adapters for n in names):  # (a parametrized weight: before anything is written)
            check_weight_writable(self.base_layer, "merge into it")
        for name in names:
            if name in self.merged_adapters:
                continue
            weight = self.base_layer.weight  # (a parametrized one is recomputed: read it again after each write)
            merged = wide(weight) + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged.to(weight.dtype)).all():  # (as stored: fp16 may overflow)
                raise ValueError(f"NaNs or infs detected in the merged weight of adapter {name!r}; "
                                 "the adapter seems to be broken")
            store_merged(self, name, merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def _unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        store_unmerged(self, name, lambda: (wide(weight) - self.get_delta_weight(name)).to(weight.dtype))
        self.merged_adapters.remove(name)

    # ------------------------------------------------------------- forward
    _fastpeft_adapter_names = None  # per-sequence adapters handed over by fastpeft.model.mixed_adapter_batch

    def _embed_scale(self) -> torch.Tensor | None:
        """The base's scalar ``embed_scale`` (a scaled word embedding multiplies its lookups by it; the adapter's
        output gets it too, as in peft), or None."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return None
        if isinstance(scale, (int, float)):
            weight = self.base_layer.weight
            return torch.tensor(scale, device=weight.device, dtype=weight.dtype)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        warnings.warn(f"Found embed_scale attribute with shape {getattr(scale, 'shape', None)}, expected scalar. "
                      "Embedding scaling will not be applied to the adapter's output.", stacklevel=3)
        return None

    def _adapter_output(self, x: torch.Tensor, name: str, embed_scale: torch.Tensor | None) -> torch.Tensor:
        """``(embedding(x, Aᵀ) @ Bᵀ) · scale`` (times ``embed_scale``) in the adapter's dtype."""
        base = self.base_layer
        A, B = self.adapter_factors(name)
        after_A = F.embedding(x, A.t(), padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                              sparse=base.sparse)
        out = (after_A @ B.t()) * self.scaling[name]
        return out if embed_scale is None else out * embed_scale.to(out.dtype)

    def forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs) -> torch.Tensor:
        """The base embedding plus every active adapter; ``adapter_names`` (one name per row of the batch,
        ``"__base__"`` for none) runs a mixed-adapter batch as peft's argument does."""
        return self._plain_forward(x, args, kwargs, adapter_names)

    def _apply_adapters(self, x: torch.Tensor, y: torch.Tensor, active: list[str]) -> torch.Tensor:
        embed_scale = self._embed_scale()
        for name in active:
            y = y + self._adapter_output(x, name, embed_scale)
        return y

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """One adapter per row of ``x`` (``"__base__"`` = none), as peft's ``adapter_names``, in eval and in
        training: the base on every row, each adapter's output added to its own rows."""
        names = self._mixed_names(x, adapter_names, self.lora_embedding_A, batched=x.dim() >= 1)
        y = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters:
            return y
        present = [n for n in dict.fromkeys(names) if n in self.lora_embedding_A]
        if self.training and torch.is_grad_enabled():
            # Trainable adapters with no row here run on zero rows: zero gradients rather than none (DDP).
            present += [n for n, A in self.lora_embedding_A.items() if n not in present and A.requires_grad]
        if not present:
            return y
        embed_scale = self._embed_scale()
        out = y
        for name in present:
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long, device=x.device)
            delta = self._adapter_output(x.index_select(0, rows), name, embed_scale)
            # each row's sum in the wider dtype, rounded once to the base's (the rows are disjoint)
            wide = torch.promote_types(out.dtype, delta.dtype)  # (under autocast the delta may be the narrower)
            out = out.to(wide).index_add(0, rows, delta.to(wide))
        return out.to(y.dtype)

    def extra_repr(self) -> str:
        """Each adapter's rank, alpha and scaling (and rsLoRA), as peft's repr lists them."""
        parts = [f"{n}: r={self.r[n]}, lora_alpha={self.lora_alpha[n]}, scaling={self.scaling[n]:g}"
                 + (", rslora" if self.use_rslora[n] else "") for n in self.lora_embedding_A]
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, " + "; ".join(parts)

    def __repr__(self) -> str:
        return "fastpeft." + super().__repr__()


__all__ = ["FastLoraEmbedding"]
