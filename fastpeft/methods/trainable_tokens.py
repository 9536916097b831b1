"""Standalone trainable tokens (peft's ``TrainableTokensConfig``, ``peft_type="TRAINABLE_TOKENS"``).

The targeted embedding (by default the model's input embeddings) is replaced by a token layer (the same layer
fastpeft uses for LoRA's ``trainable_token_indices``, :mod:`fastpeft.layers.tokens`), placed directly where the
embedding was, as peft places it: parameters ``<path>.trainable_tokens_delta.<adapter>`` (the trained rows' values),
the frozen embedding at ``<path>.base_layer``, saved keys ``base_model.model.<path>.trainable_tokens_delta``. With
``tie_word_embeddings`` the output head becomes a token layer tied to the embeddings' one (it shares its rows and
is saved under its own name too, as peft saves it). Several adapters may be added; one is active at a time.
"""

from __future__ import annotations

import contextlib

from torch import nn

from ..errors import NoMatchingPeftModuleError
from ..layers.tokens import TrainableTokensLayer, check_token_indices
from .base import matches
from .configs import TrainableTokensConfig
from .multi import MultiAdapterPeftModel, MultiAdapterTuner

_INTERNAL_PARTS = ("trainable_tokens_delta", "trainable_tokens_original")


class TokensLayer(TrainableTokensLayer):
    """fastpeft's token layer as the standalone method uses it (one active adapter; saved under peft's names)."""

    adapter_param_names = ("trainable_tokens_delta",)

    def has_adapter(self, adapter_name: str) -> bool:
        """Whether this layer holds ``adapter_name``'s rows."""
        return adapter_name in self.trainable_tokens_delta


def check_indices_in_range(indices: list[int], num_rows: int, adapter_name: str, key: str) -> list[int]:
    """``indices`` checked for the layer ``key`` of ``num_rows`` rows: out of range raises ``IndexError`` (what
    peft raises, from torch's indexing), a row listed twice ``ValueError`` (peft accepts it; the row's value is
    then undefined)."""
    for i in indices:
        if not 0 <= i < num_rows:
            raise IndexError(f"index {i} is out of bounds for dimension 0 with size {num_rows} (token_indices of "
                             f"adapter {adapter_name!r} for {key!r})")
    return check_token_indices(indices, num_rows, f"adapter {adapter_name!r} on {key!r}")


class TrainableTokensTuner(MultiAdapterTuner):
    """``base_model`` of a trainable-tokens model (peft's ``TrainableTokensModel`` layout)."""

    method_label = "trainable tokens"

    def adapter_layers(self):
        """(name, layer) for every token layer inside ``.model`` (a tied head included)."""
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, TokensLayer))

    def _input_embeddings_name(self) -> str:
        emb = None
        with contextlib.suppress(Exception):
            emb = self.model.get_input_embeddings()
        for name, module in self.model.named_modules():
            if emb is not None and (module is emb or getattr(module, "base_layer", None) is emb):
                return name
        return "embed_tokens"

    def _apply_method(self, config: TrainableTokensConfig, adapter_name: str) -> None:
        if config.target_modules is None:
            config.target_modules = self._input_embeddings_name()
        found = False
        for key in self.candidate_names():
            if any(p in _INTERNAL_PARTS for p in key.split(".")):
                continue
            if not matches(config.target_modules, key):
                continue
            found = True
            module = self.model.get_submodule(key)
            if isinstance(module, TokensLayer):
                if module.tied_adapter is not None:
                    continue  # follows the embeddings' layer
                layer = module
            else:
                layer = TokensLayer(module)
            weight = layer.base_layer.weight
            check_indices_in_range(config.token_indices, weight.shape[0], adapter_name, key)
            layer.update_layer(adapter_name, list(config.token_indices), init_weights=config.init_weights,
                               autocast_adapter_dtype=self._autocast_adapter_dtype)
            if layer is not module:
                self.replace_module(key, layer)
        if not found:
            raise NoMatchingPeftModuleError(f"Target modules {config.target_modules} not found in the base model. "
                                            "Please check the target modules and try again.")
        self._tie_output_head()

    def _tie_output_head(self) -> None:
        """With ``tie_word_embeddings``, put the head sharing the embeddings' weight in a layer tied to theirs."""
        if not getattr(getattr(self.model, "config", None), "tie_word_embeddings", False):
            return
        emb = None
        with contextlib.suppress(Exception):
            emb = self.model.get_input_embeddings()
        if not isinstance(emb, TokensLayer):
            return
        for key, module in list(self.model.named_modules()):
            if module is emb or any(p in ("base_layer",) + _INTERNAL_PARTS for p in key.split(".")):
                continue
            if isinstance(module, TokensLayer):
                if module.tied_adapter is not None:
                    continue
                module = module.base_layer  # a head targeted itself: it follows the embeddings instead (as peft)
            if isinstance(module, nn.Linear) and module.weight is emb.base_layer.weight:
                head = TokensLayer(module, tied_adapter=emb)
                head.active_adapters = list(emb.active_adapters)
                self.replace_module(key, head)

    def _activate(self, layer: TokensLayer, adapter_name: str, train: bool) -> None:
        if layer.merged:
            layer.unmerge()
        layer.active_adapters = [adapter_name] if layer.has_adapter(adapter_name) else []
        if layer.tied_adapter is None:
            for name, param in layer.trainable_tokens_delta.items():
                param.requires_grad_(train and name == adapter_name)


class TrainableTokensPeftModel(MultiAdapterPeftModel):
    """A transformers model where only some rows of the embedding train (peft's layout and saved format)."""

    tuner_class = TrainableTokensTuner
