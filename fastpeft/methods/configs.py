"""Configurations of the non-LoRA PEFT methods, with peft's field names, defaults and ``peft_type`` strings.

Where peft has the method (prompt tuning, P-tuning, prefix tuning, IA3, AdaLoRA) the config is field for field
peft's, and ``adapter_config.json`` written from it is read by peft. BitFit, Freeze and bottleneck adapters are not
in peft: their configs are fastpeft's own (``peft_type`` ``"BITFIT"``, ``"FREEZE"``, ``"BOTTLENECK"``), saved in the
same file layout.

Every config keeps the fields it does not know (e.g. ``peft_version`` written by peft) verbatim in ``extra`` and
writes them back.
"""

from __future__ import annotations

import enum
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import (  # noqa: F401  (re-exported)
    CONFIG_NAME,
    TASK_TYPES,
    AdapterConfigFile,
    PeftType,
    read_config_dict,
    write_config_json,
)

# task types the methods here implement
SUPPORTED_TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


@dataclass
class MethodConfig(AdapterConfigFile):
    """Fields every method's config has (peft's ``PeftConfig``): ``task_type``, ``inference_mode``, base model name."""

    PEFT_TYPE: ClassVar[str] = ""

    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        peft_type = str(_enum_value(self.peft_type)) if self.peft_type is not None else self.PEFT_TYPE
        if peft_type != self.PEFT_TYPE:
            raise ValueError(f"{type(self).__name__} has peft_type {self.PEFT_TYPE!r}, got {peft_type!r}")
        self.peft_type = PeftType(peft_type)  # (peft's enum: ``.value`` works; equal to its string)
        if self.task_type is not None:
            self.task_type = str(_enum_value(self.task_type))
            if self.task_type not in TASK_TYPES:
                raise ValueError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
        self._sort_collections(("target_modules", "exclude_modules", "modules_to_save", "feedforward_modules"))

    @property
    def is_prompt_learning(self) -> bool:
        """True for prompt tuning, P-tuning and prefix tuning (peft's attribute)."""
        return False

    # ----------------------------------------------------------------- dict / json
    def _skip_fields(self) -> set[str]:
        return {"extra"}

    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` contents (peft's field names; unknown saved fields written back)."""
        out = self._fields_dict(self._skip_fields())
        for key, value in list(out.items()):
            if isinstance(value, (set, tuple)):
                out[key] = sorted(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Build from a dict (as read from ``adapter_config.json``); fields unknown here go to ``extra``."""
        return cls._from_known_fields(dict(data))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs) -> MethodConfig:
        """Read ``adapter_config.json`` from a folder or Hub repo id (peft's Hub keywords: see
        :func:`fastpeft.hub.resolve_adapter_path`); on the base class, the subclass is chosen by ``peft_type``.
        As peft's: keywords naming config fields fill those the file lacks; others are ignored with a warning."""
        from ..config import config_data_for

        data = config_data_for(cls, pretrained_model_name_or_path, subfolder, kwargs)
        if cls is MethodConfig:
            return config_from_dict(data)
        return cls.from_dict(data)


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# =========================================================================== prompt learning
class PromptTuningInit(str, enum.Enum):
    """peft's choices for ``PromptTuningConfig.prompt_tuning_init`` (the plain strings work as well)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptEncoderReparameterizationType(str, enum.Enum):
    """peft's choices for ``PromptEncoderConfig.encoder_reparameterization_type`` (the plain strings work as
    well)."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptLearningConfig(MethodConfig):
    """Fields shared by prompt tuning, P-tuning and prefix tuning (peft's ``PromptLearningConfig``).

    Args:
        num_virtual_tokens: number of virtual tokens (≥ 1).
        token_dim, num_transformer_submodules, num_attention_heads, num_layers: filled from the model's config
            when None (as peft does; for prefix tuning on grouped-query attention ``token_dim`` and
            ``num_attention_heads`` describe the key/value heads).
        modules_to_save: modules trained in full and saved (the classifier head is added for SEQ_CLS/TOKEN_CLS).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is None:
            raise ValueError(f"{type(self).__name__} needs num_virtual_tokens (a positive integer)")
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            _positive_int(name, getattr(self, name), allow_none=True)

    @property
    def is_prompt_learning(self) -> bool:
        """Always True."""
        return True


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al.): ``num_virtual_tokens`` trainable embeddings prepended to the input embeddings.

    Args:
        prompt_tuning_init: ``"RANDOM"`` (default), ``"SAMPLE_VOCAB"`` (rows of the word embeddings of random
            tokens) or ``"TEXT"`` (the embeddings of ``prompt_tuning_init_text``'s tokens, repeated/cut to length).
        prompt_tuning_init_text: the text for ``"TEXT"``.
        tokenizer_name_or_path: tokenizer for ``"TEXT"`` (loaded with ``AutoTokenizer.from_pretrained``).
        tokenizer_kwargs: extra arguments for that ``from_pretrained``.
        tokenizer: fastpeft extension, not saved: a tokenizer object (a callable returning ``{"input_ids": …}``)
            used instead of loading ``tokenizer_name_or_path``.

    Example::

        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, prompt_tuning_init="TEXT",
                                    prompt_tuning_init_text="Classify the sentiment:", tokenizer=tokenizer)
    """

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = str(_enum_value(self.prompt_tuning_init))
        if self.prompt_tuning_init not in ("RANDOM", "TEXT", "SAMPLE_VOCAB"):
            raise ValueError(f"prompt_tuning_init must be 'RANDOM', 'TEXT' or 'SAMPLE_VOCAB', got "
                             f"{self.prompt_tuning_init!r}")
        if self.tokenizer is not None and self.tokenizer_name_or_path is None:
            self.tokenizer_name_or_path = getattr(self.tokenizer, "name_or_path", None) or None
        if self.prompt_tuning_init == "TEXT":
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs a tokenizer: pass tokenizer=<tokenizer> or "
                                 "tokenizer_name_or_path=<name or folder>")
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text to start from)")
        elif self.tokenizer_kwargs:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")

    def _skip_fields(self) -> set[str]:
        return {"extra", "tokenizer"}

    def to_dict(self) -> dict[str, Any]:
        """As saved. A TEXT init done with a ``tokenizer`` object that has no ``name_or_path`` is written as
        ``prompt_tuning_init="RANDOM"`` (``prompt_tuning_init_text`` kept): peft refuses a TEXT config without
        ``tokenizer_name_or_path``, and a saved adapter's virtual tokens come from its weights file, not from the
        init, so nothing is lost."""
        out = super().to_dict()
        if out.get("prompt_tuning_init") == "TEXT" and not out.get("tokenizer_name_or_path"):
            out["prompt_tuning_init"] = "RANDOM"
            out["tokenizer_kwargs"] = None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptTuningConfig:
        """Build from a saved dict. A TEXT config without ``tokenizer_name_or_path`` (as written by older fastpeft
        versions) is accepted: loading an adapter uses its saved weights and never runs the init. Such a config
        cannot initialise a new adapter (``get_peft_model`` then asks for a tokenizer)."""
        data = dict(data)
        if str(_enum_value(data.get("prompt_tuning_init"))) == "TEXT" and not data.get("tokenizer_name_or_path"):
            kwargs = data.pop("tokenizer_kwargs", None)
            data["prompt_tuning_init"] = "RANDOM"
            config = super().from_dict(data)
            config.prompt_tuning_init, config.tokenizer_kwargs = "TEXT", kwargs
            return config
        return super().from_dict(data)


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning v1: virtual tokens produced by a prompt encoder (peft's ``PromptEncoderConfig``).

    Args:
        encoder_reparameterization_type: ``"MLP"`` (3 linear layers with ReLU) or ``"LSTM"`` (a bidirectional
            LSTM of ``encoder_num_layers`` layers followed by a 2-layer MLP).
        encoder_hidden_size: hidden size of the encoder (default: ``token_dim``).
        encoder_num_layers: LSTM layers (the MLP always has 3 linear layers, as in peft).
        encoder_dropout: dropout between LSTM layers.
    """

    PEFT_TYPE: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = str(_enum_value(self.encoder_reparameterization_type))
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError("encoder_reparameterization_type must be 'MLP' or 'LSTM', got "
                             f"{self.encoder_reparameterization_type!r}")
        _positive_int("encoder_hidden_size", self.encoder_hidden_size, allow_none=True)
        _positive_int("encoder_num_layers", self.encoder_num_layers)
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning / P-tuning v2: trainable key/value prefixes for every layer (peft's ``PrefixTuningConfig``).

    Args:
        prefix_projection: produce the prefixes with an MLP (``Linear → Tanh → Linear``) from
            ``num_virtual_tokens`` embeddings instead of learning them directly.
        encoder_hidden_size: hidden size of that MLP (default ``token_dim``).
        init_weights: None (random) or ``"zero"`` (zero prefixes).
    """

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        _positive_int("encoder_hidden_size", self.encoder_hidden_size, allow_none=True)


# =========================================================================== layer methods
@dataclass
class IA3Config(MethodConfig):
    """(IA)³: learned rescaling vectors (peft's ``IA3Config``).

    Args:
        target_modules: modules whose output (or, for ``feedforward_modules``, input) is rescaled: a list
            matched on the name's dot-separated tail, or a regex matched on the whole name; None picks peft's
            default for the model type (k, v and the MLP's down projection).
        feedforward_modules: the targets rescaled at their input (a subset of ``target_modules``); matched as
            peft matches them (``name.endswith(entry)``, or a regex).
        exclude_modules: never adapted.
        fan_in_fan_out: base stores its weight (in, out) (GPT-2 ``Conv1D``; detected per layer anyway).
        modules_to_save: modules trained in full and saved.
        init_ia3_weights: start from ones (identity); False draws them from N(0, 1).
    """

    PEFT_TYPE: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            if not set(self.feedforward_modules) <= set(self.target_modules):
                raise ValueError("`feedforward_modules` should be a subset of `target_modules`")


@dataclass
class AdaLoraConfig(MethodConfig):
    """AdaLoRA: SVD-form LoRA ``ΔW = B·diag(E)·A`` with importance-based rank allocation (peft's ``AdaLoraConfig``).

    The schedule has three phases over ``total_step`` optimizer steps: ``tinit`` warm-up steps at ``init_r``;
    the budget then shrinks cubically towards ``target_r`` per matrix (masking the least important singular
    values every ``deltaT`` steps) until ``total_step - tfinal``; the last ``tfinal`` steps keep the final ranks.
    Drive it with ``model.update_and_allocate(global_step)`` after ``optimizer.step()`` and before
    ``optimizer.zero_grad()`` (it needs the gradients).

    Args:
        init_r: starting rank of every adapted matrix. target_r: average rank at the end.
        tinit, tfinal, deltaT, total_step: the schedule (``total_step`` is required).
        beta1, beta2: EMA factors of the sensitivity and its uncertainty.
        orth_reg_weight: weight of the orthogonality penalty ``‖AAᵀ − I‖_F, ‖BᵀB − I‖_F`` added to ``loss``.
        rank_pattern: after allocation, which singular values each matrix keeps (written on save).
        lora_alpha, lora_dropout, target_modules, exclude_modules, fan_in_fan_out, bias, modules_to_save,
        init_lora_weights, layers_to_transform, layers_pattern: as in LoRA (``r`` is not used; peft ignores it too).
    """

    PEFT_TYPE: ClassVar[str] = "ADALORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None

    # peft LoRA fields that must keep their neutral value here
    _NEUTRAL: ClassVar[dict[str, tuple]] = {
        "use_dora": (False, None), "use_rslora": (False, None), "loftq_config": ({}, None),
        "lora_bias": (False, None), "target_parameters": (None, []), "trainable_token_indices": (None, [], {}),
        "layer_replication": (None, []), "alpha_pattern": ({}, None), "use_qalora": (False, None),
        "eva_config": (None,), "corda_config": (None,), "lora_ga_config": (None,), "megatron_config": (None,),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, value in self.extra.items():
            if key in self._NEUTRAL and value not in self._NEUTRAL[key]:
                raise ValueError(f"peft option {key}={value!r} is not supported by fastpeft's AdaLoRA")
        if self.r != 8:  # peft's warning (8: LoraConfig's default)
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored.If you intended to set the "
                          "initial rank, use `init_r` instead.", stacklevel=3)
        _positive_int("init_r", self.init_r)
        if not isinstance(self.target_r, int) or isinstance(self.target_r, bool) or self.target_r < 0:
            raise ValueError(f"target_r must be a non-negative integer, got {self.target_r!r}")
        if self.total_step is None or self.total_step <= 0:
            raise ValueError("AdaLoRA does not work when `total_step` is None, supply a value > 0.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError("The supplied schedule values don't allow for a budgeting phase. Decrease "
                             "`tfinal`/`tinit` or increase `total_step`.")
        _positive_int("deltaT", self.deltaT)
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not 0.0 <= float(self.lora_dropout) <= 1.0:  # p = 1: nn.Dropout(1) zeroes the branch in training (peft)
            raise ValueError(f"lora_dropout must be in [0, 1], got {self.lora_dropout}")
        if self.bias not in ("none", "all"):
            raise ValueError(f"bias must be 'none' or 'all' for fastpeft's AdaLoRA, got {self.bias!r}")
        if self.init_lora_weights not in (True, False):
            raise ValueError(f"init_lora_weights must be True or False for AdaLoRA, got {self.init_lora_weights!r}")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")


@dataclass
class BottleneckConfig(MethodConfig):
    """Bottleneck adapters (Houlsby / Pfeiffer), fastpeft's own ``peft_type="BOTTLENECK"``.

    Each adapter is ``h + scaling · up(act(down(h)))`` applied to the output ``h`` of a sublayer's output
    projection (so it sits before the residual add), with ``up`` zero-initialized: the model starts as the base.

    Args:
        bottleneck_size: the adapter's inner width (≥ 1).
        adapter_type: ``"houlsby"`` (after attention and after the MLP) or ``"pfeiffer"`` (after the MLP only).
        attn_modules / ffn_modules: the output projections of attention / the MLP (suffix list or regex);
            None picks a default for the model type (llama/qwen2/mistral, gpt2, bert/roberta, t5).
        non_linearity: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        adapter_dropout: dropout on the adapter input. scaling: multiplier on the adapter branch.
        init_weights: True → up-projection zero (identity at start); False → random (for tests).
        modules_to_save: modules trained in full and saved.
    """

    PEFT_TYPE: ClassVar[str] = "BOTTLENECK"

    bottleneck_size: int = 64
    adapter_type: str = "houlsby"
    attn_modules: list[str] | str | None = None
    ffn_modules: list[str] | str | None = None
    non_linearity: str = "relu"
    adapter_dropout: float = 0.0
    scaling: float = 1.0
    init_weights: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("bottleneck_size", self.bottleneck_size)
        if self.adapter_type not in ("houlsby", "pfeiffer"):
            raise ValueError(f"adapter_type must be 'houlsby' or 'pfeiffer', got {self.adapter_type!r}")
        if self.non_linearity not in ("relu", "gelu", "silu", "tanh"):
            raise ValueError(f"non_linearity must be relu, gelu, silu or tanh, got {self.non_linearity!r}")
        if not 0.0 <= float(self.adapter_dropout) < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool) \
                or not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}")


# =========================================================================== selection methods
@dataclass
class BitFitConfig(MethodConfig):
    """BitFit: only bias parameters train (fastpeft's own ``peft_type="BITFIT"``).

    Args:
        target_modules: restrict to the biases of these modules (suffix list or regex); None = every bias.
        exclude_modules: biases never trained.
        add_bias: give targeted ``nn.Linear`` layers without a bias (Llama, T5) a zero-initialized trainable one,
            so BitFit has something to train there; saved and re-created on load.
        modules_to_save: modules trained in full too (the classifier head is added for SEQ_CLS/TOKEN_CLS); e.g.
            ``["lm_head"]``.
    """

    PEFT_TYPE: ClassVar[str] = "BITFIT"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    add_bias: bool = False
    modules_to_save: list[str] | None = None


@dataclass
class FreezeConfig(MethodConfig):
    """Freeze tuning: train only chosen layers, everything else frozen (fastpeft's own ``peft_type="FREEZE"``).

    Args:
        num_trainable_layers: train the last k blocks of each block stack (``model.layers``, ``transformer.h``,
            ``encoder.layer``, T5's ``encoder.block`` and ``decoder.block``).
        trainable_modules: also train these modules/parameters: a list (a name, or a dot-separated tail of one),
            or a regex matched on the whole parameter-owning module name.
        modules_to_save: modules trained in full too (the classifier head is added for SEQ_CLS/TOKEN_CLS).
    """

    PEFT_TYPE: ClassVar[str] = "FREEZE"

    num_trainable_layers: int | None = None
    trainable_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_trainable_layers is not None:
            if not isinstance(self.num_trainable_layers, int) or isinstance(self.num_trainable_layers, bool) \
                    or self.num_trainable_layers < 0:
                raise ValueError(f"num_trainable_layers must be a non-negative integer, got "
                                 f"{self.num_trainable_layers!r}")
        if not self.num_trainable_layers and not self.trainable_modules and not self.modules_to_save:
            if self.task_type not in ("SEQ_CLS", "TOKEN_CLS"):
                raise ValueError("FreezeConfig trains nothing: set num_trainable_layers and/or trainable_modules")


# =========================================================================== trainable tokens, LayerNorm tuning
@dataclass
class TrainableTokensConfig(MethodConfig):
    """Standalone trainable tokens: only the rows ``token_indices`` of the embedding train (peft's
    ``TrainableTokensConfig``, ``peft_type="TRAINABLE_TOKENS"``).

    Args:
        token_indices: the rows (token ids) to train; each in ``[0, num_embeddings)``.
        target_modules: the layer(s) to adapt (a list matched on the name's dot-separated tail, or a regex matched
            on the whole name); None picks the model's input embeddings (``get_input_embeddings()``, else
            ``"embed_tokens"``), saved as that module's name, as peft saves it. A head tied to those embeddings
            follows them (it uses the same trained rows).
        init_weights: start the rows from the embedding's own values (a no-op until trained); False draws them
            from N(0, 1).
    """

    PEFT_TYPE: ClassVar[str] = "TRAINABLE_TOKENS"

    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.token_indices, (tuple, range)):
            self.token_indices = list(self.token_indices)
        if not isinstance(self.token_indices, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.token_indices):
            raise TypeError(f"token_indices must be a list of ints, got {self.token_indices!r}")


@dataclass
class LNTuningConfig(MethodConfig):
    """LayerNorm tuning (Zhao et al. 2023): a trainable copy of each targeted normalization layer (LayerNorm,
    RMSNorm, …) replaces it while the adapter is active (peft's ``LNTuningConfig``, ``peft_type="LN_TUNING"``).

    Args:
        target_modules: the layers to copy and train (a list matched on the name's dot-separated tail, or a regex
            matched on the whole name); None picks peft's default for the model type (Llama: ``input_layernorm``,
            ``post_attention_layernorm``, ``norm``).
        exclude_modules: never adapted.
        modules_to_save: modules trained in full and saved (the classifier head is added for SEQ_CLS/TOKEN_CLS).
    """

    PEFT_TYPE: ClassVar[str] = "LN_TUNING"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None


CONFIG_CLASSES: dict[str, type[MethodConfig]] = {
    cls.PEFT_TYPE: cls for cls in (PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig, IA3Config,
                                   AdaLoraConfig, BottleneckConfig, BitFitConfig, FreezeConfig,
                                   TrainableTokensConfig, LNTuningConfig)
}


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """The config class for ``data["peft_type"]``, built from ``data``."""
    peft_type = str(data.get("peft_type") or "")
    if peft_type not in CONFIG_CLASSES:
        raise ValueError(f"fastpeft.methods cannot read an adapter with peft_type {peft_type!r}; it reads "
                         f"{sorted(CONFIG_CLASSES)} (and LORA via fastpeft.LoraConfig)")
    return CONFIG_CLASSES[peft_type].from_dict(data)
