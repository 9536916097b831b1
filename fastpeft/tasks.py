"""peft's task classes: ``PeftModelForCausalLM``, ``PeftModelForSeq2SeqLM``, ``PeftModelForSequenceClassification``,
``PeftModelForTokenClassification``, ``PeftModelForQuestionAnswering``, ``PeftModelForFeatureExtraction``.

As in peft, ``get_peft_model``, ``PeftModel.from_pretrained`` and the ``AutoPeftModelFor…`` loaders return the class
that ``task_type`` names (:data:`MODEL_TYPE_TO_PEFT_MODEL_MAPPING`), so ``isinstance(model, PeftModelForCausalLM)``
holds for a LoRA model made with ``task_type="CAUSAL_LM"``; a config without a task type gives a plain
:class:`fastpeft.PeftModel`. Every task class is a subclass of :class:`fastpeft.PeftModel`.

What each task class adds in peft is in fastpeft's models already, keyed by ``task_type`` whatever the class:
the classifier head (``classifier``/``score``, ``qa_outputs`` for QUESTION_ANS) in ``modules_to_save`` for
SEQ_CLS/TOKEN_CLS/QUESTION_ANS, ``generate`` for the language models, the prompt-learning forwards per task. The
classes are therefore thin: their value is the type, and the order of their ``forward`` parameters (peft's, per task:
``model(input_ids, attention_mask, inputs_embeds, labels)`` on a ``PeftModelForCausalLM``), by which positional
arguments reach the wrapped model by name. For fastpeft's other methods (IA3, AdaLoRA, prompt learning,
…) the returned class derives from both the method's model class and the task class and carries the task class's
name (``type(model).__name__ == "PeftModelForCausalLM"``, as peft's).

Constructing a task class directly works as in peft, for any method: ``PeftModelForCausalLM(model, IA3Config(...))``.
"""

from __future__ import annotations

from typing import Any

from .model import PeftModel

# The parameters of each task class's forward, in peft's order: a positional argument goes to the wrapped model
# under the name it has at that place in peft (see fastpeft.model.positional_as_keywords).
_LM_PARAMS = ("input_ids", "attention_mask", "inputs_embeds", "labels", "output_attentions", "output_hidden_states",
              "return_dict", "task_ids")
_SEQ2SEQ_PARAMS = ("input_ids", "attention_mask", "inputs_embeds", "decoder_input_ids", "decoder_attention_mask",
                   "decoder_inputs_embeds", "labels", "output_attentions", "output_hidden_states", "return_dict",
                   "task_ids")
_QA_PARAMS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "start_positions",
              "end_positions", "output_attentions", "output_hidden_states", "return_dict", "task_ids")
_FEATURE_PARAMS = ("input_ids", "attention_mask", "inputs_embeds", "output_attentions", "output_hidden_states",
                   "return_dict", "task_ids")


class PeftModelForCausalLM(PeftModel):
    """peft's ``PeftModelForCausalLM``: a :class:`fastpeft.PeftModel` for ``task_type="CAUSAL_LM"`` (``generate``
    with the adapter applied, as the base class)."""

    _peft_forward_params = _LM_PARAMS

    @property
    def base_model_prepare_inputs_for_generation(self):
        """The wrapped transformers model's own ``prepare_inputs_for_generation`` (peft's attribute)."""
        return self.get_base_model().prepare_inputs_for_generation


class PeftModelForSeq2SeqLM(PeftModel):
    """peft's ``PeftModelForSeq2SeqLM``: a :class:`fastpeft.PeftModel` for ``task_type="SEQ_2_SEQ_LM"``."""

    _peft_forward_params = _SEQ2SEQ_PARAMS

    @property
    def base_model_prepare_inputs_for_generation(self):
        """The wrapped transformers model's own ``prepare_inputs_for_generation`` (peft's attribute)."""
        return self.get_base_model().prepare_inputs_for_generation

    @property
    def base_model_prepare_encoder_decoder_kwargs_for_generation(self):
        """The wrapped transformers model's own ``_prepare_encoder_decoder_kwargs_for_generation`` (peft's
        attribute)."""
        return self.get_base_model()._prepare_encoder_decoder_kwargs_for_generation


class PeftModelForSequenceClassification(PeftModel):
    """peft's ``PeftModelForSequenceClassification``: a :class:`fastpeft.PeftModel` for ``task_type="SEQ_CLS"``; the
    classifier head (``classifier`` or ``score``) is added to ``modules_to_save`` (trained in full and saved)."""

    _peft_forward_params = _LM_PARAMS


class PeftModelForTokenClassification(PeftModel):
    """peft's ``PeftModelForTokenClassification``: a :class:`fastpeft.PeftModel` for ``task_type="TOKEN_CLS"``; the
    classifier head (``classifier`` or ``score``) is added to ``modules_to_save``."""

    _peft_forward_params = _LM_PARAMS


class PeftModelForQuestionAnswering(PeftModel):
    """peft's ``PeftModelForQuestionAnswering``: a :class:`fastpeft.PeftModel` for ``task_type="QUESTION_ANS"``; the
    ``qa_outputs`` head is added to ``modules_to_save``."""

    _peft_forward_params = _QA_PARAMS


class PeftModelForFeatureExtraction(PeftModel):
    """peft's ``PeftModelForFeatureExtraction``: a :class:`fastpeft.PeftModel` for
    ``task_type="FEATURE_EXTRACTION"``."""

    _peft_forward_params = _FEATURE_PARAMS


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "CAUSAL_LM": PeftModelForCausalLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}
"""peft's mapping of ``task_type`` to the task class ``get_peft_model`` returns."""

_TASK_CLASSES = frozenset(MODEL_TYPE_TO_PEFT_MODEL_MAPPING.values())
_COMBINED: dict[tuple[type, type], type] = {}


def is_dispatching_class(cls: type) -> bool:
    """True for :class:`fastpeft.PeftModel` itself and the six task classes: the classes whose constructor picks
    the method's model class from the config (a non-LoRA config builds that method's model)."""
    return cls is PeftModel or cls in _TASK_CLASSES


def with_task(model_class: type, task: type | str | None) -> type:
    """``model_class`` (fastpeft's ``PeftModel`` or one method's model class) as the task class ``task`` (a task
    class, or a ``task_type`` string; None or a type without a task class leaves ``model_class`` as it is).

    For ``PeftModel`` this is the task class itself; for a method's class it is a subclass of both (the method's
    class first, so its behaviour wins), named as the task class, made once per pair."""
    if isinstance(task, str) or task is None:
        task = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(getattr(task, "value", task))) if task else None
    if task is None or issubclass(model_class, task):
        return model_class
    if model_class is PeftModel:
        return task
    key = (model_class, task)
    if key not in _COMBINED:
        # named as the task class; found by pickle under its own qualified name (see the module __getattr__)
        _COMBINED[key] = type(task.__name__, (model_class, task), {
            "__module__": __name__, "__qualname__": f"{model_class.__name__}{_SEP}{task.__name__}",
            "__doc__": f"{model_class.__name__} as peft's {task.__name__} (see :mod:`fastpeft.tasks`)."})
    return _COMBINED[key]


_SEP = "__as__"


def _method_model_classes() -> dict[str, type]:
    """fastpeft's model classes of the other methods, by name."""
    from .methods import adalora, bottleneck, ia3, prompt, select  # noqa: F401 - defines the classes

    found, todo = {}, [PeftModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("fastpeft.methods.") and sub.__name__ not in found:
                found[sub.__name__] = sub
            todo.append(sub)
    return found


def __getattr__(name: str):
    """``<MethodClass>__as__<TaskClass>``: the class :func:`with_task` makes (so that pickle finds it by name)."""
    base_name, sep, task_name = name.partition(_SEP)
    if sep:
        task = next((t for t in _TASK_CLASSES if t.__name__ == task_name), None)
        base = _method_model_classes().get(base_name)
        if task is not None and base is not None:
            return with_task(base, task)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_class_for(config: Any, task: type | None = None) -> type:
    """The class ``get_peft_model`` builds for ``config``: the method's model class (``PeftModel`` for LoRA) as the
    task class of ``config.task_type``, or as ``task`` when given (a task class constructed directly)."""
    from .config import LoraConfig

    if isinstance(config, LoraConfig):
        base = PeftModel
    else:
        from .methods import _coerce_config, _method_class

        base = _method_class(_coerce_config(config))
    return with_task(base, task if task is not None else getattr(config, "task_type", None))
