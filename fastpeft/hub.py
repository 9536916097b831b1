"""Adapters on the Hugging Face Hub, as peft users keep them.

- :func:`resolve_adapter_path`: ``from_pretrained`` / ``load_adapter`` / ``LoraConfig.from_pretrained`` accept a
  local folder or a Hub repo id (``"user/my-lora"``), with peft's keywords ``subfolder``, ``revision``,
  ``token``, ``cache_dir``, ``local_files_only``, ``force_download`` and ``proxies``. Only the adapter files are
  downloaded (``adapter_config.json`` and the weights: ``adapter_model.safetensors``, or ``adapter_model.bin`` in a
  repo without it), into the usual Hub cache, so offline use
  (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) works from that cache as with peft.
- :func:`write_model_card`: the ``README.md`` peft writes beside an adapter (``library_name: peft``, the base
  model, tags), which is what makes the Hub list a repo as an adapter of its base model.
- :func:`push_to_hub`: upload the adapter files only (never the base model's weights).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import TYPE_CHECKING, Any

from .config import CONFIG_NAME
from .save import PICKLE_NAME, SAFETENSORS_NAME

if TYPE_CHECKING:
    from torch import nn

HUB_KWARGS = ("subfolder", "revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
_ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME)
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                    "chat_template*")


def pop_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove peft's Hub keywords from ``kwargs`` (``use_auth_token`` is read as ``token``) and return them."""
    hub = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
    if "use_auth_token" in kwargs:
        token = kwargs.pop("use_auth_token")
        hub.setdefault("token", token)
    return hub


def warn_unused_kwargs(where: str, kwargs: dict[str, Any]) -> None:
    """Warn about keywords ``where`` (a loading function) was given and does not use (peft drops them silently:
    a misspelt keyword would otherwise go unnoticed). ``torch_device`` (peft's ``from_pretrained`` passes it on to
    ``load_adapter``; here the weights are copied where the adapter lives) is accepted without a word."""
    kwargs.pop("torch_device", None)
    if kwargs:
        warnings.warn(f"{where} ignores the keyword argument(s) {sorted(kwargs)} (not a loading or Hub option)",
                      stacklevel=3)


def resolve_adapter_path(model_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
                         token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                         local_files_only: bool = False, force_download: bool = False,
                         proxies: dict | None = None, with_tokenizer: bool = False) -> str:
    """The local folder holding the adapter ``model_id`` names (with ``subfolder`` inside it, if given).

    A local folder (or a ``.json`` file) is returned as it is; anything else is read as a Hub repo id, whose
    adapter files are downloaded into the Hub cache (``revision`` a branch, tag or commit). Errors say both
    what was looked for locally and what the Hub answered. ``with_tokenizer`` downloads a tokenizer saved
    beside the adapter too (``AutoPeftModel`` resizes the embeddings to it).
    """
    path = os.fspath(model_id)
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local) or (os.path.isfile(local) and local.endswith(".json")):
        return local
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} has no subfolder {subfolder!r} (found: {sorted(os.listdir(path))})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""

    def download(names: tuple[str, ...]) -> str:
        kwargs = dict(revision=revision, token=token, cache_dir=cache_dir, force_download=force_download,
                      proxies=proxies, allow_patterns=[prefix + name for name in names])
        try:
            return snapshot_download(path, local_files_only=local_files_only, **kwargs)
        except HFValidationError:
            raise
        except Exception:
            # Hub unreachable (offline, no network): a snapshot already in the cache still serves, as transformers'
            # loaders fall back to it (huggingface_hub 1.x does not for a commit-hash revision by itself)
            if local_files_only or force_download:
                raise
            try:
                return snapshot_download(path, local_files_only=True, **kwargs)
            except Exception:
                pass
            raise

    try:
        # the safetensors weights; the pickle only when the repo has no safetensors (as peft, one weights file)
        root = download(_ADAPTER_FILES[:2] + (_TOKENIZER_FILES if with_tokenizer else ()))
        if not os.path.isfile(os.path.join(root, prefix, SAFETENSORS_NAME)):
            root = download(_ADAPTER_FILES[2:])
    except HFValidationError:
        raise FileNotFoundError(f"adapter folder {path!r} does not exist (and it is not a Hub repo id)") from None
    except Exception as exc:  # noqa: BLE001 — every Hub failure gets the same two-sided message
        where = f"revision {revision!r} of " if revision else ""
        raise FileNotFoundError(
            f"{path!r} is not a local adapter folder, and {where}the Hub repo {path!r} could not be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    folder = os.path.join(root, prefix) if prefix else root
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        inside = f" in its subfolder {subfolder!r}" if subfolder else ""
        raise FileNotFoundError(f"the Hub repo {path!r} has no {CONFIG_NAME}{inside}: it is not a peft "
                                "adapter (a full model is loaded with transformers' from_pretrained)")
    return folder.rstrip("/")


def write_model_card(peft_model: nn.Module, save_directory: str | os.PathLike, tags: list[str] | None = None) -> None:
    """Create or update ``save_directory/README.md`` as peft does: metadata ``library_name: peft``,
    ``base_model`` (the base's ``name_or_path``, unless that is a local folder), tags (the peft type, ``transformers``,
    ``base_model:adapter:<base>``, ``fastpeft``, and ``tags``) and ``pipeline_tag: text-generation`` for causal
    LMs; a card the user wrote keeps its text, and gains those fields and a framework-versions line."""
    from huggingface_hub import ModelCard

    from . import __version__

    filename = os.path.join(os.fspath(save_directory), "README.md")
    base = peft_model.get_base_model()
    config = peft_model.active_peft_config
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    base_name = getattr(getattr(base, "config", None), "_name_or_path", None) or getattr(base, "name_or_path", None)
    if os.path.exists(filename):
        card = ModelCard.load(filename)
    else:
        text = ("# Adapter\n\n"
                f"A {peft_type} adapter in peft's format, trained with fastpeft"
                + (f" on `{base_name}`" if base_name else "") + ".\n\n"
                "```python\n"
                "from transformers import AutoModelForCausalLM\n"
                "from fastpeft import PeftModel  # or: from peft import PeftModel\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({base_name or '<base model>'!r})\n"
                "model = PeftModel.from_pretrained(base, '<this repo or folder>')\n"
                "```\n")
        card = ModelCard(f"---\nlibrary_name: peft\n---\n\n{text}")
    card.data["library_name"] = "peft"
    tags = set(card.data.get("tags") or []) | set(tags or [])
    tags |= set(getattr(base, "model_tags", None) or [])
    tags |= {"fastpeft", peft_type.lower()}
    try:
        import transformers

        if isinstance(base, transformers.PreTrainedModel):
            tags.add("transformers")
    except ImportError:  # pragma: no cover - transformers is a dependency of every model fastpeft wraps
        pass
    # a local folder is no Hub model id: the Hub refuses such a base_model on upload (transformers' cards skip it)
    if base_name and not os.path.isdir(base_name):
        tags.add(f"base_model:adapter:{base_name}")
        card.data["base_model"] = base_name
    card.data["tags"] = sorted(tags)
    if not card.data.get("pipeline_tag") and str(getattr(config, "task_type", "")).endswith("CAUSAL_LM"):
        card.data["pipeline_tag"] = "text-generation"
    lines = card.text.splitlines()
    heading, entry = "### Framework versions", f"- fastpeft {__version__}"
    if entry not in lines:
        if heading in lines:
            lines.insert(lines.index(heading) + 2, entry)
        else:
            lines += ["", heading, "", entry]
    card.text = "\n".join(lines) + "\n"
    card.save(filename)


def push_to_hub(peft_model: nn.Module, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                safe_serialization: bool = True, selected_adapters: list[str] | None = None,
                commit_description: str | None = None, tags: list[str] | None = None) -> Any:
    """Save the adapter(s) as ``save_pretrained`` does into a temporary folder and upload it to ``repo_id``
    (created if missing, ``private`` as asked; ``revision`` a branch, created if missing, or a ``refs/pr/N`` to add
    to; with ``create_pr`` a pull request against that branch).
    Only adapter files and the model card (with ``tags`` added; a card the repo has keeps its text and metadata)
    go up, never the base model's weights. Returns huggingface_hub's commit info."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RevisionNotFoundError

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):  # a PR ref exists already
        try:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        except HfHubHTTPError as exc:
            # a PR to someone else's repo: no right to make branches there; the branch must exist (the upload
            # says so if it does not), as transformers' push_to_hub assumes
            if not (create_pr and exc.response is not None and exc.response.status_code == 403):
                raise
    with tempfile.TemporaryDirectory() as folder:
        # the repo's own card, which save_pretrained then updates (its text and metadata kept, as transformers'
        # push_to_hub keeps it)
        try:
            shutil.copy(api.hf_hub_download(repo_id, "README.md", revision=revision), os.path.join(folder, "README.md"))
        except (EntryNotFoundError, RevisionNotFoundError):  # a new repo or branch: a new card
            pass
        peft_model.save_pretrained(folder, selected_adapters=selected_adapters, safe_serialization=safe_serialization)
        if tags:
            write_model_card(peft_model, folder, tags=tags)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or "Upload adapter with fastpeft",
                                 commit_description=commit_description)
