"""Prompt learning: prompt tuning, P-tuning v1 and prefix tuning / P-tuning v2, in plain PyTorch.

The object layout is peft's: ``PeftModel.base_model`` is the transformers model itself (parameter names
``base_model.<path>``), ``prompt_encoder[adapter]`` holds the trainable encoder
(``prompt_encoder.default.embedding.weight`` …), and the saved file holds one tensor, ``prompt_embeddings`` —
the encoder's *output* (virtual-token embeddings, or flattened key/value prefixes) — plus any
``modules_to_save`` (``base_model.classifier.weight`` …). A loaded adapter therefore runs those saved embeddings
directly (no MLP/LSTM/projection), as peft does.

How inputs change (as in peft):

* prompt tuning / P-tuning: the virtual-token embeddings are prepended to the input embeddings; the attention
  mask gets ``num_virtual_tokens`` ones in front; causal-LM labels get ``-100`` in front (token classification
  labels too — peft leaves those unextended, which cannot compute a loss); ``position_ids`` are dropped with a
  warning; for seq2seq only the encoder input is extended.
* prefix tuning: every attention layer gets ``num_virtual_tokens`` extra keys/values through a transformers
  ``Cache`` (``DynamicCache``; ``EncoderDecoderCache`` with an empty cross-attention cache for encoder-decoder
  models); the attention mask gets ones in front, given ``position_ids`` are shifted by ``num_virtual_tokens``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings

import torch
from torch import nn

from ..model import ModulesToSaveWrapper, record_base_model_name
from ..model import PeftModel as _LoraPeftModel
from ..save import full_tensors
from .base import (
    SignedForward,
    check_task_fit,
    load_into_own_adapter,
    modules_to_save_for,
    read_adapter_file,
    refuse_adapter_names,
    save_one_adapter,
    wrap_modules_to_save,
)
from .configs import MethodConfig, PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig


# --------------------------------------------------------------------------- encoders
class PromptEmbedding(nn.Module):
    """Prompt tuning's encoder: an embedding table of the virtual tokens (init random, from vocab, or from text)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module, direct: bool = False):
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        if direct or config.inference_mode:
            return
        ids = None
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
        elif config.prompt_tuning_init == "TEXT":
            ids = _text_ids(config, total)
        if ids is not None:
            with torch.no_grad():
                rows = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
            self.embedding.weight = nn.Parameter(rows)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """The virtual tokens' embeddings for ``indices`` (virtual-token positions)."""
        return self.embedding(indices)


def _text_ids(config: PromptTuningConfig, total: int) -> torch.Tensor:
    tokenizer = config.tokenizer
    if tokenizer is None and not config.tokenizer_name_or_path:
        raise ValueError("prompt_tuning_init='TEXT' needs a tokenizer: pass tokenizer=<tokenizer> or "
                         "tokenizer_name_or_path=<name or folder> to the PromptTuningConfig")
    if tokenizer is None:
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # a config never chooses code to run
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to no tokens")
    ids = (ids * math.ceil(total / len(ids)))[:total]
    return torch.tensor(ids, dtype=torch.long)


class PromptEncoder(nn.Module):
    """P-tuning v1's encoder: virtual-token embeddings passed through an MLP or a bidirectional LSTM + MLP."""

    def __init__(self, config: PromptEncoderConfig, direct: bool = False):
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = "DIRECT" if direct or config.inference_mode else config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.num_virtual_tokens * config.num_transformer_submodules, dim)
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        elif self.encoder_type == "MLP":
            if config.encoder_num_layers != 2:
                warnings.warn("for MLP, the argument `encoder_num_layers` is ignored: the MLP has 3 linear layers",
                              stacklevel=4)
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """The virtual tokens' embeddings for ``indices``, re-parametrized by the MLP or LSTM head."""
        x = self.embedding(indices)
        if self.encoder_type == "LSTM":
            return self.mlp_head(self.lstm_head(x)[0])
        if self.encoder_type == "MLP":
            return self.mlp_head(x)
        return x


class PrefixEncoder(nn.Module):
    """Prefix tuning's encoder: per virtual token, the keys and values of every layer (flattened), learned directly
    or produced by ``Linear → Tanh → Linear`` from a smaller embedding (``prefix_projection``)."""

    def __init__(self, config: PrefixTuningConfig, direct: bool = False):
        super().__init__()
        flat = config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection and not (direct or config.inference_mode)
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, flat))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, flat)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Every layer's keys and values (flattened) for the virtual tokens ``indices``."""
        x = self.embedding(indices)
        return self.transform(x) if self.prefix_projection else x


# --------------------------------------------------------------------------- config completion
def _fill_config(config: PromptLearningConfig, model: nn.Module) -> None:
    """Fill the model-dependent fields as peft does (GQA: prefix sizes follow the key/value heads)."""
    mcfg = getattr(model, "config", None)
    if mcfg is not None and hasattr(mcfg, "get_text_config"):
        mcfg = mcfg.get_text_config()

    def first(*names):
        for n in names:
            v = getattr(mcfg, n, None)
            if v is not None:
                return v
        return None

    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    if config.num_layers is None:
        config.num_layers = first("num_hidden_layers", "num_layers", "n_layer")
    given_dim = config.token_dim is not None
    if config.token_dim is None:
        config.token_dim = first("hidden_size", "n_embd", "d_model")
    if config.num_attention_heads is None:
        config.num_attention_heads = first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    missing = [n for n in ("num_layers", "token_dim", "num_attention_heads") if getattr(config, n) is None]
    if missing:
        raise ValueError(f"cannot read {missing} from the model's config; set them in the {type(config).__name__}")
    if isinstance(config, PrefixTuningConfig) and getattr(mcfg, "num_key_value_heads", None) is not None:
        if not given_dim or config.num_attention_heads != mcfg.num_key_value_heads:
            head_dim = getattr(mcfg, "head_dim", None) or config.token_dim // config.num_attention_heads
            config.token_dim = head_dim * mcfg.num_key_value_heads
            config.num_attention_heads = mcfg.num_key_value_heads
    if isinstance(config, (PrefixTuningConfig, PromptEncoderConfig)) and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if isinstance(config, PrefixTuningConfig) and config.token_dim % config.num_attention_heads:
        raise ValueError(f"token_dim {config.token_dim} is not a multiple of num_attention_heads "
                         f"{config.num_attention_heads}")


def _cache_kwarg(module: nn.Module) -> str:
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# --------------------------------------------------------------------------- the model
class PromptLearningPeftModel(_LoraPeftModel):
    """A transformers model with a prompt-learning adapter (prompt tuning, P-tuning, prefix tuning).

    ``forward`` takes the base model's arguments and returns its output (logits include the virtual tokens for
    prompt tuning / P-tuning on decoder-only and encoder models, as in peft). ``generate`` works for CAUSAL_LM
    and SEQ_2_SEQ_LM. One adapter per model.
    """

    def __init__(self, model: nn.Module, peft_config: PromptLearningConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, *, _direct: bool = False):
        from ..model import warn_low_cpu_mem_usage

        nn.Module.__init__(self)
        if not autocast_adapter_dtype:
            raise NotImplementedError(f"autocast_adapter_dtype=False is implemented for LoRA only, not for "
                                      f"{type(peft_config).__name__}")
        warn_low_cpu_mem_usage(low_cpu_mem_usage)
        if not isinstance(peft_config, PromptLearningConfig):
            raise TypeError(f"expected a prompt-learning config, got {type(peft_config).__name__}")
        check_task_fit(model, peft_config, type(peft_config).__name__)
        if isinstance(peft_config, PrefixTuningConfig):
            if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
                raise ValueError("prefix tuning passes its prefixes through the KV cache, which does not work with "
                                 "gradient checkpointing; disable it")
        self.base_model = model
        for p in model.parameters():
            p.requires_grad_(False)
        _fill_config(peft_config, model)
        record_base_model_name(peft_config, model)
        self._peft_config = {adapter_name: peft_config}
        self._adapter = adapter_name
        self._adapters_disabled = False
        self.word_embeddings = model.get_input_embeddings()  # registered, as in peft (shared, counted once)
        if self.word_embeddings is None:
            raise ValueError(f"{type(model).__name__} has no input embeddings; prompt learning needs them")
        if isinstance(peft_config, PromptTuningConfig):
            encoder = PromptEmbedding(peft_config, self.word_embeddings, direct=_direct)
        elif isinstance(peft_config, PromptEncoderConfig):
            encoder = PromptEncoder(peft_config, direct=_direct)
        else:
            encoder = PrefixEncoder(peft_config, direct=_direct)
        encoder.to(self.word_embeddings.weight.device)
        self.prompt_encoder = nn.ModuleDict({adapter_name: encoder})
        mts = modules_to_save_for(model, peft_config)
        if mts:
            peft_config.modules_to_save = mts
            wrap_modules_to_save(model, mts, adapter_name)
        if peft_config.inference_mode:
            for p in self.parameters():
                p.requires_grad_(False)

    # ----------------------------------------------------------------- adapter bookkeeping
    @property
    def peft_config(self) -> dict[str, MethodConfig]:
        return self._peft_config

    @property
    def active_adapter(self) -> str:
        return self._adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._adapter]

    @property
    def active_peft_config(self) -> PromptLearningConfig:
        return self._peft_config[self._adapter]

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model."""
        return self.base_model

    def add_adapter(self, *args, **kwargs) -> None:
        """Not supported: one prompt-learning adapter per model."""
        raise NotImplementedError("fastpeft's prompt-learning models hold one adapter")

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: dict[str, str] | None = None, allow_pickle: bool = False, **kwargs):
        """Load saved weights into the model's own adapter (how transformers' Trainer resumes from a
        checkpoint); without ``is_trainable`` the model is put in eval mode. peft's format keeps the computed
        prompt table only, so a model training a P-tuning MLP/LSTM or a prefix projection cannot take it
        back (RuntimeError: load it with ``from_pretrained`` for inference instead). ``model_id``: a local folder
        or a Hub repo id, with peft's Hub keywords (see :func:`fastpeft.hub.resolve_adapter_path`).
        ``ignore_mismatched_sizes=True`` (peft's keyword) skips mis-shaped tensors with peft's warning."""
        from ..hub import pop_hub_kwargs, resolve_adapter_path, warn_unused_kwargs

        if adapter_name != self._adapter:
            raise NotImplementedError(f"fastpeft's prompt-learning models hold one adapter ({self._adapter!r})")
        encoder = self.prompt_encoder[adapter_name]
        if getattr(encoder, "encoder_type", "DIRECT") != "DIRECT" or getattr(encoder, "prefix_projection", False):
            raise RuntimeError("the saved adapter holds the computed prompt table, not this model's prompt encoder "
                               "(P-tuning MLP/LSTM or prefix projection): it cannot be loaded back for training; "
                               "use from_pretrained on a fresh model for inference")
        model_id = resolve_adapter_path(model_id, **pop_hub_kwargs(kwargs))
        ignore = kwargs.pop("ignore_mismatched_sizes", False)
        warn_unused_kwargs(f"{type(self).__name__}.load_adapter", kwargs)
        return load_into_own_adapter(self, model_id, adapter_name, is_trainable, allow_pickle, key_mapping, ignore)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Only the model's own adapter name is accepted."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != [self._adapter]:
            raise ValueError(f"unknown adapter(s) {names}; this model has {list(self._peft_config)}")

    def delete_adapter(self, adapter_name: str) -> None:
        """Not supported."""
        raise NotImplementedError("fastpeft's prompt-learning models cannot delete their only adapter")

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        """Prompt learning cannot be merged into the weights (peft refuses too)."""
        raise NotImplementedError("prompt-learning adapters cannot be merged into the base weights")

    def unload(self) -> nn.Module:
        """The base model without the virtual tokens (``modules_to_save`` back to their originals)."""
        for name, module in list(self.base_model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent, child = name.rsplit(".", 1) if "." in name else ("", name)
                setattr(self.base_model.get_submodule(parent) if parent else self.base_model, child,
                        module.original_module)
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the context the model runs as the base model (no virtual tokens, original heads). At the exit
        everything is as it was at the entry (as peft: a nested block leaves the outer one's state alone)."""
        wrappers = [m for m in self.base_model.modules() if isinstance(m, ModulesToSaveWrapper)]
        was_disabled = self._adapters_disabled
        wrappers_on = [not w._disable_adapters for w in wrappers]
        self._adapters_disabled = True
        for w in wrappers:
            w.enable_adapters(False)
        try:
            yield
        finally:
            self._adapters_disabled = was_disabled
            for w, on in zip(wrappers, wrappers_on):
                if on:
                    w.enable_adapters(True)

    # ----------------------------------------------------------------- prompts
    @property
    def _is_prefix(self) -> bool:
        return isinstance(self.active_peft_config, PrefixTuningConfig)

    def _encoder_output(self, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The prompt encoder's output ``(1, n, width)`` (with ``params`` in place of its parameters, if given)."""
        cfg = self.active_peft_config
        encoder = self.prompt_encoder[self._adapter]
        n = cfg.num_virtual_tokens if self._is_prefix else cfg.num_virtual_tokens * cfg.num_transformer_submodules
        tokens = torch.arange(n, device=encoder.embedding.weight.device).unsqueeze(0)
        if params is not None:
            return torch.func.functional_call(encoder, params, (tokens,))
        return encoder(tokens)

    def get_prompt(self, batch_size: int) -> torch.Tensor | object:
        """The virtual-token embeddings ``(batch, tokens, dim)``, or for prefix tuning a filled ``Cache``."""
        if self._is_prefix:
            return self._prefix_cache(batch_size)
        return self._encoder_output().expand(batch_size, -1, -1)

    def _prefix_cache(self, batch_size: int):
        from transformers import DynamicCache, EncoderDecoderCache

        cfg = self.active_peft_config
        n, layers, heads = cfg.num_virtual_tokens, cfg.num_layers, cfg.num_attention_heads
        x = self._encoder_output()
        dtype = getattr(self.base_model, "dtype", None)
        x = x.expand(batch_size, -1, -1)
        if dtype is not None:  # after the expansion, as peft: the batch's gradients are summed in fp32
            x = x.to(dtype)
        x = x.reshape(batch_size, n, 2 * layers, heads, cfg.token_dim // heads)
        x = x.permute(2, 0, 3, 1, 4)  # (2·layers, batch, heads, n, head_dim): rows k0, v0, k1, v1, …
        if cfg.num_transformer_submodules == 1:
            return DynamicCache([(x[2 * i], x[2 * i + 1]) for i in range(layers)])
        # Encoder-decoder: peft stacks the rows twice and hands layer i the 4 rows from 4·i — keys/values of
        # row (4·i mod 2·layers) for the decoder's self-attention; the cross-attention cache starts empty.
        # Reproduced as is so that adapters move between peft and fastpeft with the same outputs.
        rows = [((4 * i) % (2 * layers), (4 * i + 1) % (2 * layers)) for i in range(layers)]
        return EncoderDecoderCache(DynamicCache([(x[k], x[v]) for k, v in rows]), DynamicCache())

    # ----------------------------------------------------------------- forward
    @property
    def forward(self):
        """Runs :meth:`prompt_forward`; the signature is the wrapped transformers model's (for Trainer)."""
        return SignedForward(self.prompt_forward, self.base_model.forward, self)

    def prompt_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        """Run the base model with the virtual tokens (see the module docstring for how inputs change)."""
        if self._adapters_disabled:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   labels=labels, **kwargs)
        cfg = self.active_peft_config
        task = cfg.task_type
        n = cfg.num_virtual_tokens
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds")
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]

        def ones_then(mask):
            return torch.cat([mask.new_ones(batch_size, n), mask], dim=1)

        if kwargs.get("position_ids") is not None:
            if self._is_prefix:
                kwargs["position_ids"] = kwargs["position_ids"] + n
            else:
                warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.",
                              stacklevel=2)
                kwargs["position_ids"] = None
        if task == "CAUSAL_LM" and kwargs.get("token_type_ids") is not None:
            warnings.warn("token_type_ids are not supported with prompt learning; ignoring them", stacklevel=2)
            kwargs["token_type_ids"] = None

        if self._is_prefix:
            cache = self._prefix_cache(batch_size)
            if task == "SEQ_2_SEQ_LM":
                if kwargs.get("decoder_attention_mask") is not None:
                    kwargs["decoder_attention_mask"] = ones_then(kwargs["decoder_attention_mask"])
            elif attention_mask is not None:
                attention_mask = ones_then(attention_mask)
            if task in ("SEQ_CLS", "TOKEN_CLS") and _cache_kwarg(self.base_model) != "cache" and \
                    "past_key_values" not in inspect.signature(self.base_model.forward).parameters:
                return self._prefix_classifier_forward(input_ids, attention_mask, inputs_embeds, labels, cache,
                                                       **kwargs)
            kwargs[_cache_kwarg(self.base_model)] = cache
            if labels is not None:
                kwargs["labels"] = labels
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   **kwargs)

        # prompt tuning / P-tuning: prepend the virtual-token embeddings
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        prompts = self.get_prompt(batch_size).to(inputs_embeds.dtype)
        if attention_mask is not None:
            attention_mask = ones_then(attention_mask)
        if task == "SEQ_2_SEQ_LM":
            inputs_embeds = torch.cat([prompts[:, :n], inputs_embeds], dim=1)
        else:
            inputs_embeds = torch.cat([prompts, inputs_embeds], dim=1)
            if labels is not None and task in ("CAUSAL_LM", "TOKEN_CLS"):
                labels = torch.cat([labels.new_full((batch_size, n), -100), labels], dim=1)
            if kwargs.get("token_type_ids") is not None:
                tt = kwargs["token_type_ids"]
                kwargs["token_type_ids"] = torch.cat([tt.new_zeros(batch_size, n), tt], dim=1)
            if task == "QUESTION_ANS":  # the answer span moves with its tokens, past the virtual ones (peft: not)
                for key in ("start_positions", "end_positions"):
                    if kwargs.get(key) is not None:
                        kwargs[key] = kwargs[key] + n
        if labels is not None:  # (QA and feature-extraction models take no labels)
            kwargs["labels"] = labels
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def _prefix_classifier_forward(self, input_ids, attention_mask, inputs_embeds, labels, cache, **kwargs):
        """Classifier models whose head class takes no cache: run the backbone with it, then dropout + head."""
        from transformers import PreTrainedModel
        from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput

        backbone = next((m for _, m in self.base_model.named_children() if isinstance(m, PreTrainedModel)), None)
        if backbone is None or _cache_kwarg(backbone) not in inspect.signature(backbone.forward).parameters:
            raise ValueError(f"{type(self.base_model).__name__} takes no key/value cache; prefix tuning needs one")
        kwargs.pop("return_dict", None)
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                       **{_cache_kwarg(backbone): cache}, **kwargs)
        task = self.active_peft_config.task_type
        hidden = out[1] if task == "SEQ_CLS" and len(out) > 1 and out[1] is not None else out[0]
        dropout = getattr(self.base_model, "dropout", None)
        if isinstance(dropout, nn.Module):
            hidden = dropout(hidden)
        head = next(getattr(self.base_model, h) for h in ("classifier", "score") if hasattr(self.base_model, h))
        logits = head(hidden)
        loss = None
        if labels is not None:
            loss = self._classifier_loss(task, logits, labels)
        cls = SequenceClassifierOutput if task == "SEQ_CLS" else TokenClassifierOutput
        return cls(loss=loss, logits=logits, hidden_states=getattr(out, "hidden_states", None),
                   attentions=getattr(out, "attentions", None))

    def _classifier_loss(self, task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss transformers' classifier heads compute (``ForSequenceClassificationLoss`` /
        ``ForTokenClassification``): for SEQ_CLS, ``config.problem_type`` when set, else regression for one label,
        single-label classification for long/int labels, multi-label otherwise — and, as transformers does, the
        choice is written back to the model's config so later calls keep it."""
        mcfg = getattr(self.base_model, "config", None)
        num_labels = getattr(mcfg, "num_labels", None) or logits.shape[-1]
        labels = labels.to(logits.device)
        if task == "TOKEN_CLS":
            return nn.functional.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
        problem = getattr(mcfg, "problem_type", None)
        if problem is None:
            if num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
            if mcfg is not None:
                mcfg.problem_type = problem
        if problem == "regression":
            if num_labels == 1:
                return nn.functional.mse_loss(logits.squeeze(), labels.squeeze())
            return nn.functional.mse_loss(logits, labels)
        if problem == "single_label_classification":
            return nn.functional.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
        if problem == "multi_label_classification":
            return nn.functional.binary_cross_entropy_with_logits(logits, labels)
        raise ValueError(f"unknown problem_type {problem!r} in the model's config")

    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        """transformers' activation checkpointing on the base model; refused for prefix tuning (its prefixes travel
        in the KV cache, which checkpointed layers do not keep: peft fails there on a shape mismatch)."""
        if self._is_prefix:
            raise ValueError("prefix tuning passes its prefixes through the KV cache, which does not work with "
                             "gradient checkpointing; leave it off (or use prompt tuning / P-tuning)")
        return self.base_model.gradient_checkpointing_enable(*args, **kwargs)

    # ----------------------------------------------------------------- generation
    def generate(self, *args, **kwargs):
        """``generate`` of the base model with the virtual tokens / prefixes (CAUSAL_LM and SEQ_2_SEQ_LM).

        The output holds the input ids followed by the new tokens (decoder-only) or the decoder ids (seq2seq).
        """
        from ..model import use_own_generation_config

        cfg = self.active_peft_config
        refuse_adapter_names(self, kwargs)
        use_own_generation_config(self, self.base_model)
        if self._adapters_disabled:
            return self.base_model.generate(*args, **kwargs)
        if cfg.task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            raise ValueError(f"generate needs task_type CAUSAL_LM or SEQ_2_SEQ_LM, this adapter has {cfg.task_type!r}")
        if args:
            kwargs["input_ids"] = args[0]
            args = args[1:]
        if kwargs.get("input_ids") is None:
            raise ValueError("pass input_ids to generate with a prompt-learning adapter")
        if kwargs.get("position_ids") is not None and not self._is_prefix:
            warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.",
                          stacklevel=2)
            kwargs.pop("position_ids")
        if cfg.task_type == "SEQ_2_SEQ_LM" and not self._is_prefix:
            input_ids = kwargs.pop("input_ids")
            kwargs.pop("encoder_outputs", None)
            embeds = self.word_embeddings(input_ids)
            prompts = self.get_prompt(input_ids.shape[0]).to(embeds.dtype)
            kwargs["inputs_embeds"] = torch.cat([prompts[:, :cfg.num_virtual_tokens], embeds], dim=1)
            if kwargs.get("attention_mask") is not None:
                am = kwargs["attention_mask"]
                kwargs["attention_mask"] = torch.cat([am.new_ones(am.shape[0], cfg.num_virtual_tokens), am], dim=1)
            return self.base_model.generate(*args, **kwargs)
        original = self.base_model.prepare_inputs_for_generation
        self.base_model.prepare_inputs_for_generation = self._make_prepare(original)
        try:
            return self.base_model.generate(*args, **kwargs)
        finally:
            del self.base_model.prepare_inputs_for_generation  # back to the class's method

    def _make_prepare(self, original):
        cfg = self.active_peft_config
        n = cfg.num_virtual_tokens
        seq2seq = cfg.task_type == "SEQ_2_SEQ_LM"

        def prepare(*args, **kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            first = cache is None or cache.get_seq_length() == 0
            inputs = original(*args, **kwargs)
            ids_key = "decoder_input_ids" if seq2seq else "input_ids"
            ids = inputs.get(ids_key)
            if ids is None:
                raise ValueError("generation with a prompt-learning adapter needs input_ids, not inputs_embeds")
            batch_size = ids.shape[0]
            if not seq2seq:
                am = inputs.get("attention_mask")
                if am is not None:
                    if not isinstance(am, torch.Tensor) or am.dim() != 2:
                        raise ValueError("prompt learning generates with 2-D attention masks only (use the default "
                                         "dynamic cache)")
                    inputs["attention_mask"] = torch.cat([am.new_ones(batch_size, n), am], dim=1)
                if inputs.get("position_ids") is not None:
                    inputs["position_ids"] = inputs["position_ids"] + n if self._is_prefix else None
            if self._is_prefix:
                # without caching every step sees the whole sequence again: the prefix starts afresh each time (a
                # model such as Llama hands back the cache it was given, grown by the step, even with use_cache=False)
                if first or inputs.get("use_cache", kwargs.get("use_cache")) is False:
                    key = "cache" if "cache" in inputs or "cache" in kwargs else "past_key_values"
                    inputs[key] = self._prefix_cache(batch_size)
            elif first:
                embeds = self.word_embeddings(ids)
                inputs["inputs_embeds"] = torch.cat([self.get_prompt(batch_size).to(embeds.dtype), embeds], dim=1)
                inputs["input_ids"] = None
            return inputs

        return prepare

    # ----------------------------------------------------------------- save / load
    def get_prompt_embedding_to_save(self, adapter_name: str = "default") -> torch.Tensor:
        """What ``save_pretrained`` writes as ``prompt_embeddings``: the encoder's output, ``(tokens, width)``."""
        if adapter_name != self._adapter:
            raise ValueError(f"unknown adapter {adapter_name!r}")
        encoder = self.prompt_encoder[self._adapter]
        with torch.no_grad():
            if not any(hasattr(p, "full_tensor") for p in encoder.parameters()):
                return self._encoder_output()[0].detach().cpu()
            # FSDP2 shards the encoder's parameters outside forward: run it on the gathered ones (collective)
            return self._encoder_output(full_tensors(dict(encoder.named_parameters())))[0].detach().cpu()

    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """``prompt_embeddings`` plus the ``modules_to_save`` copies under peft's names (FSDP2's shards gathered:
        every rank must call it)."""
        out = {"prompt_embeddings": self.get_prompt_embedding_to_save(adapter_name)}
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                for pname, value in module.modules_to_save[adapter_name].state_dict().items():
                    out[f"base_model.{name}.{pname}"] = value
        return full_tensors(out)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None, **kwargs) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's format (an adapter not named
        ``"default"`` into ``save_directory/<name>``, as peft), and peft's model card. Parameters in peft's order;
        ``save_embedding_layers`` and ``path_initial_model_for_weight_conversion`` are accepted and unused."""
        from ..hub import write_model_card
        from ..model import adapter_folders

        # peft's layout: "default" in save_directory, another name in save_directory/<name>
        for name, out in adapter_folders(self, save_directory, selected_adapters):
            save_one_adapter(self, name, out, safe_serialization, is_main_process)
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            write_model_card(self, save_directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: MethodConfig | None = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict[str, str] | None = None,
                        allow_pickle: bool = False, **kwargs) -> PromptLearningPeftModel:
        """Load a prompt-learning adapter (peft's or fastpeft's) onto ``model``. Parameters in peft's order
        (``key_mapping``: peft's rewrite of the saved keys; the others after ``config`` change nothing here).

        The saved ``prompt_embeddings`` become the encoder's table and are used directly (a P-tuning MLP/LSTM or a
        prefix projection is not re-created); with ``is_trainable=True`` that table trains on.
        """
        import copy

        from ..hub import pop_hub_kwargs, resolve_adapter_path, warn_unused_kwargs

        model_id = resolve_adapter_path(model_id, **pop_hub_kwargs(kwargs))
        ignore = kwargs.pop("ignore_mismatched_sizes", False)
        warn_unused_kwargs(f"{cls.__name__}.from_pretrained", kwargs)
        if config is None:
            config = MethodConfig.from_pretrained(model_id)
        config = copy.copy(config)
        config.inference_mode = not is_trainable
        saved = read_adapter_file(model_id, allow_pickle=allow_pickle, key_mapping=key_mapping)
        peft_model = cls(model, config, adapter_name, _direct=True)
        peft_model._load_adapter_state(saved, adapter_name, f"adapter file in {os.fspath(model_id)!r}", ignore)
        if is_trainable:
            peft_model.prompt_encoder[adapter_name].embedding.weight.requires_grad_(True)
        else:
            peft_model.eval()
        return peft_model

    def _load_adapter_state(self, saved: dict[str, torch.Tensor], adapter_name: str, where: str,
                            ignore_mismatched_sizes: bool = False) -> None:
        """Copy a saved adapter (``prompt_embeddings`` + modules_to_save copies) into the encoder's table,
        strictly: missing, unexpected or mis-shaped tensors raise ``ValueError`` naming them and ``where``
        (mis-shaped ones are skipped with peft's warning under ``ignore_mismatched_sizes``)."""
        from ..save import warn_ignored_sizes

        state = self.adapter_state_dict(adapter_name)
        missing = [k for k in state if k not in saved]
        unexpected = [k for k in saved if k not in state]
        if missing or unexpected:
            raise ValueError(f"{where} does not fit this model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        mismatched = [(k, tuple(v.shape), tuple(state[k].shape)) for k, v in saved.items() if v.shape != state[k].shape]
        if mismatched and not ignore_mismatched_sizes:
            key, file_shape, model_shape = mismatched[0]
            raise ValueError(f"{where}: {key} has shape {file_shape}, this model/config expects {model_shape} "
                             "(peft's ignore_mismatched_sizes=True skips such tensors)")
        skip = {k for k, _, _ in mismatched}
        warn_ignored_sizes(self, mismatched)
        table = self.prompt_encoder[adapter_name].embedding.weight
        with torch.no_grad():
            if "prompt_embeddings" not in skip:
                table.copy_(saved["prompt_embeddings"].to(table.dtype))
            for name, module in self.base_model.named_modules():
                if isinstance(module, ModulesToSaveWrapper):
                    for pname, value in module.modules_to_save[adapter_name].state_dict().items():
                        if f"base_model.{name}.{pname}" not in skip:
                            value.copy_(saved[f"base_model.{name}.{pname}"].to(value.dtype))
