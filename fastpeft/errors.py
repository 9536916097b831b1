"""peft's error and warning classes, so that code catching them works on fastpeft unchanged.

- :class:`PeftError`: the base of the errors below.
- :class:`NoMatchingPeftModuleError`: an adapter's ``target_modules`` / ``target_parameters`` matched nothing in
  the base model (or everything matched was excluded). It is also a ``ValueError``, as peft's, so code written
  for the plain ``ValueError`` raised before keeps working.
- :class:`PeftWarning`: the base of the library's own warnings (e.g. ``lora_bias=True`` on a layer without a
  bias), so ``warnings.filterwarnings("ignore", category=PeftWarning)`` silences them.

Example::

    from fastpeft import NoMatchingPeftModuleError, get_peft_model
    try:
        model = get_peft_model(model, config)
    except NoMatchingPeftModuleError as err:
        print("this model has none of", config.target_modules, ":", err)
"""

from __future__ import annotations


class PeftError(Exception):
    """Base class of fastpeft's (and peft's) own errors."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """The adapter being added matched no module or parameter of the base model (``target_modules``,
    ``target_parameters``, ``exclude_modules`` and ``modules_to_save`` left nothing to adapt)."""


class PeftWarning(UserWarning):
    """Base class of fastpeft's (and peft's) own warnings."""
