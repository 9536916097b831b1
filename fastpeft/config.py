"""``LoraConfig``: peft's LoRA configuration, field for field, read from and written to ``adapter_config.json``.

A peft user keeps their configs: the fields fastpeft implements carry peft's names,
defaults and meanings; the peft fields fastpeft does not implement are accepted
only at their neutral value (e.g. ``megatron_config=None``) and refused with a clear
error otherwise; peft fields unknown to this version are kept verbatim and
written back, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from .layers.lora_init import INIT_CHOICES, check_loftq_config, init_kind  # noqa: F401 - INIT_CHOICES re-exported

CONFIG_NAME = "adapter_config.json"

class TaskType(str, enum.Enum):
    """peft's ``TaskType`` (``LoraConfig(task_type=TaskType.CAUSAL_LM)``); equal to its string value."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


TASK_TYPES = tuple(t.value for t in TaskType)


class PeftType(str, enum.Enum):
    """peft's ``PeftType`` for the methods fastpeft builds (plus fastpeft's own ``BOTTLENECK``, ``BITFIT`` and
    ``FREEZE``): what every config's ``peft_type`` holds, as in peft (``config.peft_type.value`` is ``"LORA"``).
    Each member equals its string (``config.peft_type == "LORA"``), and ``str()`` / f-strings give the value on
    every Python version. peft's other types are absent on purpose: fastpeft cannot build them."""

    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    BOTTLENECK = "BOTTLENECK"
    BITFIT = "BITFIT"
    FREEZE = "FREEZE"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    LN_TUNING = "LN_TUNING"

    __str__ = str.__str__
    __format__ = str.__format__

BIAS_CHOICES = ("none", "all", "lora_only")

# peft LoraConfig fields fastpeft does not implement, with the values under which they change nothing.
_NEUTRAL: dict[str, tuple] = {
    "corda_config": (None,),
    "lora_ga_config": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "megatron_config": (None,),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
}

# Further peft LoraConfig fields that only describe (versions, auto mapping) or tune features fastpeft lacks:
# accepted as keywords and kept in ``extra`` like the neutral ones.
_PASSIVE = ("auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "runtime_config")

# peft's defaults for the attention projections of common architectures (the same facts peft ships in
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, 0.21: no more, no fewer), used when ``target_modules`` is None;
# for another model type peft raises, and so does fastpeft.
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    **{t: ["q_proj", "v_proj"] for t in ("bart", "opt", "gptj", "gpt_neo", "llama", "llama4", "mistral", "mixtral",
                                           "stablelm", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3")},
    **{t: ["query_key_value"] for t in ("bloom", "gpt_neox", "chatglm", "RefinedWebModel", "RefinedWeb", "falcon")},
    **{t: ["c_attn"] for t in ("gpt2", "gpt_bigcode")},
    **{t: ["query", "value"] for t in ("bert", "roberta", "xlm-roberta", "electra", "layoutlm")},
    **{t: ["q", "v"] for t in ("t5", "mt5")},
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "mpt": ["Wqkv"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


@dataclass
class LoftQConfig:
    """peft's ``LoftQConfig``: the quantization of ``init_lora_weights="loftq"``.

    Args:
        loftq_bits: bits of the quantized base (4: NF4; the only value fastpeft implements).
        loftq_iter: alternating quantize / SVD iterations (≥ 1).

    Example::

        config = LoraConfig(r=16, lora_alpha=16, init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4))
    """

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclass
class EvaConfig:
    """peft's ``EvaConfig``: the settings of ``init_lora_weights="eva"`` (Explained Variance Adaptation,
    Paischer et al. 2024), read by :func:`fastpeft.initialize_lora_eva_weights` / :func:`fastpeft.get_eva_state_dict`.

    Args:
        rho: rank redistribution (≥ 1): a layer may get up to ``round(r · rho)`` of the total budget
            (the sum of the layers' ranks); 1.0 keeps every layer at its rank.
        tau: cosine-similarity threshold (in [0, 1]) between two successive estimates of a layer's right-singular
            vectors at which they count as converged (the data loop stops when all needed ones have).
        use_label_mask: leave out the positions whose ``labels`` equal ``label_mask_value``.
        label_mask_value: the ignored label (-100).
        whiten: divide each singular vector by the square root of its singular value.
        adjust_scaling_factors: after redistribution, ``lora_alpha`` of a layer whose rank changed from r to r' is
            multiplied by r'/r (so its scale ``alpha / r`` stays the same); recorded in ``alpha_pattern``.

    Example::

        config = LoraConfig(r=16, target_modules="all-linear", init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or self.rho < 1.0:
            raise ValueError(f"`rho` must be >= 1.0, got {self.rho!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"`tau` must be between 0.0 and 1.0, got {self.tau!r}")


def check_eva_config(eva_config) -> EvaConfig | None:
    """``eva_config`` as fastpeft's ``EvaConfig``: None, an ``EvaConfig`` (fastpeft's or peft's) or its dict (as
    ``adapter_config.json`` stores it); unknown fields raise ``ValueError``."""
    if eva_config is None or isinstance(eva_config, EvaConfig):
        return eva_config
    if isinstance(eva_config, dict):
        data = dict(eva_config)
    elif dataclasses.is_dataclass(eva_config) and type(eva_config).__name__ == "EvaConfig":  # peft's
        data = dataclasses.asdict(eva_config)
    else:
        raise TypeError(f"eva_config must be an EvaConfig, its dict or None, got {type(eva_config).__name__}")
    names = {f.name for f in dataclasses.fields(EvaConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown eva_config field(s) {unknown}; EvaConfig has {sorted(names)}")
    return EvaConfig(**data)


class AdapterConfigFile:
    """What ``LoraConfig`` and the other methods' configs (dataclasses with an ``extra`` dict of the saved fields
    they do not know) share about ``adapter_config.json``."""

    def _sort_collections(self, names: tuple[str, ...]) -> None:
        """Turn the fields ``names`` that hold a set or tuple into sorted lists (as peft stores them)."""
        for name in names:
            value = getattr(self, name, None)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))

    def _fields_dict(self, skip: set[str]) -> dict[str, Any]:
        """The dataclass fields not in ``skip``, then the kept unknown fields (``extra``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out.update(self.extra)
        return out

    @classmethod
    def _from_known_fields(cls, data: dict[str, Any]):
        """``cls(**fields)`` from ``data``, the keys that are not fields of ``cls`` kept in ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (created if needed; a file there is refused, as
        peft). peft's ``auto_mapping_dict`` keyword is written as the ``auto_mapping`` field; other keywords
        (peft passes them on to nothing) are ignored."""
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({os.fspath(save_directory)}) should be a directory, not a file")
        data = self.to_dict()
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping is not None:
            data["auto_mapping"] = auto_mapping
        write_config_json(data, save_directory)

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs) -> dict[str, Any]:
        """peft's: the JSON object in ``path_json_file`` (a dict, not a config), a ``runtime_config`` key dropped
        with peft's warning."""
        with open(path_json_file, encoding="utf-8") as f:
            data = json.load(f)
        if "runtime_config" in data:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored. Runtime "
                          "configurations are only valid at runtime.", stacklevel=2)
            del data["runtime_config"]
        return data

    @classmethod
    def from_peft_type(cls, **kwargs):
        """peft's: the config of ``kwargs["peft_type"]`` (else of this class) built from ``kwargs``; fields this
        class does not know are kept in ``extra`` (checked as those of a loaded ``adapter_config.json``)."""
        from .api import get_peft_config

        if "peft_type" in kwargs:
            return get_peft_config(dict(kwargs))
        return cls.from_dict(dict(kwargs))


def config_data_for(cls: type, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None,
                    kwargs: dict[str, Any]) -> dict[str, Any]:
    """What peft's ``PeftConfig.from_pretrained`` builds a config from: the saved ``adapter_config.json`` (a
    folder, the file, or a Hub repo id, with peft's Hub keywords ``revision``, ``token``, ``cache_dir``, ...),
    keywords naming fields of ``cls`` filling the fields the file lacks (saved values win, as in peft, with a
    warning where they differ), other keywords ignored with a warning (peft drops both silently)."""
    from .hub import pop_hub_kwargs, resolve_adapter_path

    hub = pop_hub_kwargs(kwargs)
    kwargs.pop("user_agent", None)  # peft's download label
    path = resolve_adapter_path(pretrained_model_name_or_path, subfolder=subfolder, **hub)
    data = read_config_dict(path)
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    names |= {"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping"}
    unused = sorted(k for k in kwargs if k not in names)
    if unused:
        warnings.warn(f"{cls.__name__}.from_pretrained ignores the keyword argument(s) {unused} (neither a config "
                      "field nor a Hub option)", stacklevel=3)
    shadowed = sorted(k for k in kwargs if k in names and k in data and kwargs[k] != data[k])
    if shadowed:
        warnings.warn(f"{cls.__name__}.from_pretrained: the saved value(s) of {shadowed} win over the keyword "
                      "argument(s), as in peft; set attributes on the returned config to change them", stacklevel=3)
    return {**{k: v for k, v in kwargs.items() if k in names}, **data}


@dataclass
class LoraConfig(AdapterConfigFile):
    """LoRA configuration with peft's field names, defaults and meanings.

    Args:
        r: LoRA rank (≥ 1).
        lora_alpha: scaling numerator: scale = ``lora_alpha / r`` (``/ √r`` with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch input, in [0, 1] (1: the branch is zero in training).
        target_modules: module names to adapt: a list matched on the name's last dot-separated
            parts (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), a regex string matched with
            ``re.fullmatch`` against the whole name, or ``"all-linear"`` (every linear layer except the
            output head). ``None`` picks peft's default for the model type.
        target_parameters: parameters to adapt directly (peft's option, e.g. MoE expert stacks:
            ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``): a list of names, each matched against
            ``<module path>.<parameter name>`` exactly or as its dot-separated tail; 2-D ``(out, in)`` and 3-D
            ``(experts, out, in)`` parameters (``(experts, in, out)`` on modules with ``is_transposed``), ``r``
            per expert. Works beside ``target_modules`` (``target_modules=[]`` for none). As in peft:
            ``exclude_modules`` / ``layers_to_transform`` do not apply to it, it refuses ``lora_dropout``,
            ``fan_in_fan_out``, ``lora_bias``, DoRA and mixed adapter batches, and every adapter of a model must
            target the same parameters. See ``fastpeft.layers.param``.
        trainable_token_indices: train only these rows of an embedding (peft's option, e.g. for new special
            tokens): a list of token ids (the model's input embeddings) or ``{module name: [ids]}`` (the name matched
            as a ``target_modules`` list entry is: exactly or as a dot-separated tail). Each row's trained value
            replaces the original (saved as ``<path>.token_adapter.trainable_tokens_delta``); under
            ``tie_word_embeddings`` the output head follows the input embeddings. Works beside LoRA on other
            layers; not on a layer that is also in ``target_modules`` or ``modules_to_save``. Ids must be in
            range and listed once. See ``fastpeft.layers.tokens``.
        exclude_modules: names (list, suffix match) or regex (string) never adapted.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head);
            for ``task_type="SEQ_CLS"``/``"TOKEN_CLS"`` the head (``classifier``/``score``) is added as peft does.
        ensure_weight_tying: on a model whose output head shares the input embeddings' weight
            (``tie_word_embeddings=True``), tie the adapters of the two as well (peft's option, as peft does it):
            ``target_modules`` naming ``embed_tokens`` or ``lm_head`` gives LoRA to the input embeddings (their
            name is added to ``target_modules``, the head's removed) and the head a LoRA layer whose ``lora_A`` /
            ``lora_B`` are ``lora_embedding_B``ᵀ / ``lora_embedding_A``ᵀ (the same memory: one update moves both);
            ``modules_to_save`` naming either copies the input embeddings (their name replaces the head's) and the
            head's copy shares that copy's weight; ``trainable_token_indices`` on a tied pair with different ids
            is refused. Saved keys and ``adapter_config.json`` are peft's. A model without tied weights gets
            peft's warning and nothing is tied. Merging a tied LoRA pair adds its delta once to the shared
            weight, which stays shared. See ``fastpeft.model._plan_weight_tying``.
        bias: ``"none"``, ``"all"`` (every bias trains and is saved) or ``"lora_only"`` (biases of adapted layers).
        fan_in_fan_out: base stores its weight as (in, out) (GPT-2 ``Conv1D``); detected per layer anyway.
        use_rslora: rank-stabilized scaling ``lora_alpha / √r``.
        use_dora: weight-decomposed LoRA (DoRA, Liu et al. 2024), as peft's: each adapted layer gets a
            trainable magnitude vector ``m`` (one entry per output feature, initialized to the row norms of
            ``W0 + scale·B·A``) and computes ``m / ‖W0 + scale·B·A‖_row ⊙ (x (W0 + scale·B·A)ᵀ) + b``, the
            norm detached from the gradient. Saved as peft saves it (``<path>.lora_magnitude_vector``).
        lora_bias: give each adapted linear layer's ``lora_B`` a trainable bias ``b_B`` (peft's option): the
            layer adds ``scale·(B A D(x) + b_B)`` (dropout never touches ``b_B``), zero at init with
            ``init_lora_weights=True`` (nn.Linear's default init with False), merged into the base bias as
            ``b + scale·b_B`` (impossible on a base without bias, as in peft). Saved as
            ``<path>.lora_B.bias``. As peft: only with ``init_lora_weights`` True or False, not with DoRA,
            not on embeddings.
        alora_invocation_tokens: Activated LoRA (aLoRA, peft's option): the token ids of the invocation
            string. The adapter then acts only on each sequence's tokens from the start of the last occurrence
            of these ids onward (the tokens before it see the base model alone, so a causal LM reuses the base
            model's KV cache for them); a sequence without them sees the base model throughout. The model's
            ``forward`` and ``generate`` find the invocation in ``input_ids`` (or take ``alora_offsets``, one
            count of activated tokens per sequence, as peft). Linear layers only (4-bit bases included), not with
            DoRA; an aLoRA adapter cannot be merged. Meant for ``task_type="CAUSAL_LM"`` (peft warns otherwise).
            See ``fastpeft.alora``.
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero), ``False`` (random B: not an identity),
            ``"gaussian"`` (A ~ N(0, 1/r)), ``"orthogonal"`` (peft 0.21's: A and B from complementary halves of a
            random orthogonal matrix, B·A = 0; even r), ``"mica"`` (peft 0.21's Minor Component Adaptation: B = the
            r left singular vectors of the base with the smallest singular values, frozen; A = 0; linear layers),
            ``"pissa"`` (principal singular vectors; the base keeps the residual),
            ``"pissa_niter_<K>"`` (the same from ``torch.svd_lowrank`` with K iterations: fast, random),
            ``"olora"`` (QR factors; the base keeps the residual), ``"loftq"`` (with ``loftq_config``: the base
            becomes its NF4 round trip, A and B the SVD of the quantization error) or ``"eva"`` (B zero; A set from
            data by ``fastpeft.initialize_lora_eva_weights``, see ``eva_config``). PiSSA and OLoRA also run on
            4-bit bases (decoded, the residual re-quantized). See ``fastpeft.layers.lora_init``.
        loftq_config: a ``LoftQConfig`` (fastpeft's or peft's) or its dict, stored as the dict
            (``{"loftq_bits": 4, "loftq_iter": 1}``); required by ``"loftq"``, emptied (with peft's warning)
            otherwise.
        eva_config: an ``EvaConfig`` (or its dict) for ``init_lora_weights="eva"`` (the default one, with peft's
            warning, when omitted); saved as its dict. EVA (data-driven: A from the right-singular vectors of
            each layer's inputs over a dataloader, ranks redistributed) then runs with
            ``fastpeft.initialize_lora_eva_weights(model, dataloader)``; see ``fastpeft.eva``.
        rank_pattern / alpha_pattern: per-module overrides, ``{regex: value}`` matched against the name's tail.
        layers_to_transform / layers_pattern: restrict adaptation to these layer indices.
        layer_replication: ``[[start, end], ...]``: before the adapters are injected, the decoder's layer list
            becomes the concatenation of these ranges of the original layers (``[[0, 4], [2, 5]]``: layers 0, 1,
            2, 3, 2, 3, 4), the copies sharing the originals' weights, each with its own adapters (peft's option,
            for growing a model by repeating layers). Such a model cannot merge its adapters (see
            ``fastpeft.replication``).
        task_type: ``"CAUSAL_LM"``, ``"SEQ_CLS"``, ``"SEQ_2_SEQ_LM"``, ``"TOKEN_CLS"``, … (or None).
        inference_mode: adapters load frozen.
        base_model_name_or_path, revision: recorded in ``adapter_config.json`` on save.

    Example::

        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                            task_type="CAUSAL_LM")
        model = fastpeft.get_peft_model(model, config)
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    ensure_weight_tying: bool = False
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    alora_invocation_tokens: list[int] | None = None
    init_lora_weights: bool | str = True
    loftq_config: dict[str, int] = field(default_factory=dict)
    eva_config: EvaConfig | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    layer_replication: list[list[int]] | None = None
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_type: str = "LORA"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.peft_type != "LORA":
            raise ValueError(f"LoraConfig has peft_type 'LORA', got {self.peft_type!r}")
        self.peft_type = PeftType.LORA  # (peft's enum: ``.value`` works; equal to "LORA")
        if self.task_type is not None:  # peft's TaskType (or fastpeft's) -> its string
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) <= 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1], got {self.lora_dropout}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        kind, _ = init_kind(self.init_lora_weights)  # raises on an unknown value, listing the supported ones
        if self.lora_bias is None:  # (accepted as "off", as it was while the option was refused)
            self.lora_bias = False
        if self.ensure_weight_tying is None:  # (likewise)
            self.ensure_weight_tying = False
        if not isinstance(self.ensure_weight_tying, bool):
            raise TypeError(f"ensure_weight_tying must be a bool, got {self.ensure_weight_tying!r}")
        if self.lora_bias:  # peft's checks, with peft's messages
            if self.init_lora_weights not in (True, False):
                raise ValueError("The argument lora_bias=True is only supported with init_lora_weights=True or "
                                 f"False, got init_lora_weights={self.init_lora_weights} instead.")
            if self.use_dora:
                raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass "
                                 "use_dora=False")
        self.alora_invocation_tokens = _check_alora_invocation_tokens(self.alora_invocation_tokens)
        if self.alora_invocation_tokens is not None:
            if self.use_dora:  # peft refuses the pair when the layers are made ("unsupported variant combination")
                raise ValueError("aLoRA (alora_invocation_tokens) cannot be combined with DoRA (use_dora=True), as in "
                                 "peft: use one or the other")
            if self.task_type != "CAUSAL_LM":  # peft's warning
                warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.", stacklevel=3)
        if kind == "loftq":
            self.loftq_config = check_loftq_config(self.loftq_config)
        elif self.loftq_config:
            self.loftq_config = {}
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                          stacklevel=3)
        elif self.loftq_config is None:
            self.loftq_config = {}
        self.eva_config = check_eva_config(self.eva_config)
        if kind == "eva" and self.eva_config is None:  # peft's warnings
            warnings.warn("`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA config.",
                          stacklevel=3)
            self.eva_config = EvaConfig()
        elif kind != "eva" and self.eva_config is not None:
            warnings.warn("`eva_config` specified but will be ignored when `init_lora_weights` is not 'eva'.",
                          stacklevel=3)
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and kind in ("pissa", "olora"):
            warnings.warn("Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and PiSSA/OLoRA means that "
                          "you won't be able to pass `path_initial_model_for_weight_conversion` to "
                          "`save_pretrained` to restore the initial values of the base weights.", stacklevel=3)
        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of strings or None.")
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters) if isinstance(self.target_parameters, set) \
                else list(self.target_parameters)
        if self.target_parameters is not None and (not isinstance(self.target_parameters, list) or not all(
                isinstance(t, str) and t for t in self.target_parameters)):
            raise TypeError(f"`target_parameters` must be a list of non-empty strings or None, got "
                            f"{self.target_parameters!r}")
        self.trainable_token_indices = _check_trainable_token_indices(self.trainable_token_indices)
        self.layer_replication = _check_layer_replication(self.layer_replication)
        self._sort_collections(("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"))
        if isinstance(self.layers_to_transform, (set, tuple)):
            self.layers_to_transform = list(self.layers_to_transform)
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        for key, r in self.rank_pattern.items():
            if not isinstance(r, int) or r <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {r!r}")
        for key, value in self.extra.items():
            _check_neutral(key, value)

    # ----------------------------------------------------------------- dict / json
    @property
    def is_prompt_learning(self) -> bool:
        """Always False (peft's attribute)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` contents: fastpeft's fields plus the peft fields it kept."""
        out = self._fields_dict({"extra"})
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(out.get(name), (set, tuple)):
                out[name] = sorted(out[name])
        if isinstance(out.get("eva_config"), EvaConfig):
            out["eva_config"] = dataclasses.asdict(out["eva_config"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build from a peft-style dict; unsupported peft features raise ``ValueError``."""
        data = dict(data)
        peft_type = data.pop("peft_type", "LORA") or "LORA"
        if peft_type != "LORA":
            raise ValueError(f"this adapter config has peft_type {peft_type!r}; fastpeft.LoraConfig reads LORA "
                             "adapters only")
        return cls._from_known_fields(data)  # peft_type is popped: the field keeps its default "LORA"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs) -> LoraConfig:
        """Read ``adapter_config.json`` from a folder (or the file itself) or a Hub repo id (peft's Hub keywords
        ``subfolder``, ``revision``, ``token``, ...: see :func:`fastpeft.hub.resolve_adapter_path`). As peft's:
        keywords naming config fields fill those the file lacks; other keywords are ignored (with a warning)."""
        return cls.from_dict(config_data_for(cls, pretrained_model_name_or_path, subfolder, kwargs))


def _accept_peft_keywords(cls):
    """Let ``cls(...)`` take peft's LoraConfig keywords fastpeft does not implement, as peft users write
    them (``LoraConfig(r=8, megatron_config=None)``): kept in ``extra`` and checked to be neutral, like the
    fields of a loaded ``adapter_config.json``. Other unknown keywords still raise ``TypeError``."""
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        peft_only = {k: kwargs.pop(k) for k in list(kwargs) if k in _NEUTRAL or k in _PASSIVE}
        if peft_only:
            kwargs["extra"] = {**peft_only, **dict(kwargs.get("extra") or {})}
        init(self, *args, **kwargs)

    __init__.__wrapped__ = init
    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return cls


_accept_peft_keywords(LoraConfig)


def from_peft_lora_config(config: Any) -> Any:
    """A peft ``LoraConfig`` object (users mixing ``from peft import LoraConfig`` with fastpeft's functions) read as
    fastpeft's, field by field as its ``adapter_config.json`` would be; any other object is returned unchanged."""
    if type(config).__module__.startswith("peft.") and hasattr(config, "to_dict") and \
            str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None))) == "LORA":
        data = {k: getattr(v, "value", v) for k, v in config.to_dict().items()}
        data.pop("runtime_config", None)
        return LoraConfig.from_dict(data)
    return config


def read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path/adapter_config.json`` (or ``path`` itself if it is a .json file)."""
    path = os.fspath(path)
    file = path if path.endswith(".json") else os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_NAME} at {path!r}")
    with open(file, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def write_config_json(data: dict[str, Any], save_directory: str | os.PathLike) -> None:
    """Write ``data`` as ``save_directory/adapter_config.json`` the way peft does (indent 2, sorted keys)."""
    os.makedirs(save_directory, exist_ok=True)
    with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")


def _check_trainable_token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices`` checked (a list of non-negative ints, each once, or a dict of module name -> such
    a list), tuples made lists; the ids' upper bound is checked against the layer when the adapter is injected."""
    if value is None:
        return None

    def ids(v: Any, where: str) -> list[int]:
        if isinstance(v, tuple):
            v = list(v)
        if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise TypeError(f"trainable_token_indices{where} must be a list of ints, got {v!r}")
        neg = [i for i in v if i < 0]
        if neg:
            raise ValueError(f"trainable_token_indices{where} must be non-negative token ids, got {neg}")
        if len(set(v)) != len(v):
            raise ValueError(f"trainable_token_indices{where} lists {sorted({i for i in v if v.count(i) > 1})} "
                             "more than once")
        return v

    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str) or not key:
                raise TypeError(f"trainable_token_indices keys must be module names (str), got {key!r}")
        return {k: ids(v, f"[{k!r}]") for k, v in value.items()}
    return ids(value, "")


def _check_alora_invocation_tokens(value: Any) -> list[int] | None:
    """``alora_invocation_tokens`` checked: None or a non-empty list of non-negative token ids (tuples made lists)."""
    if value is None:
        return None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not value \
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ValueError(f"alora_invocation_tokens must be None or a non-empty list of token ids (ints >= 0), got "
                         f"{value!r}")
    return value


def _check_layer_replication(value: Any) -> list[list[int]] | None:
    """``layer_replication`` checked: None (or empty: None) or ``[start, end)`` pairs of layer indices with
    ``0 <= start < end``, as lists; the model's layer count is checked when the layers are replicated."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"layer_replication must be a list of [start, end] pairs, got {value!r}")
    out = []
    for pair in value:
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 \
            and all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
        if not ok or not 0 <= pair[0] < pair[1]:
            raise ValueError(f"layer_replication must be [start, end] pairs with 0 <= start < end, got {pair!r} "
                             f"in {value!r}")
        out.append([int(pair[0]), int(pair[1])])
    return out


def _check_neutral(key: str, value: Any) -> None:
    if key in _NEUTRAL and value not in _NEUTRAL[key]:
        raise ValueError(f"peft option {key}={value!r} is not supported by fastpeft (supported only at "
                         f"{_NEUTRAL[key][0]!r}); use peft for this adapter")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return sorted(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return getattr(obj, "value", str(obj))
