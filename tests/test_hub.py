"""Adapters on the Hub: loading by repo id (through a Hub cache built on disk, read offline exactly as
huggingface_hub reads a real one), the model card save_pretrained writes, and push_to_hub uploading the
adapter only. peft 0.21 loading the same cache is the reference."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import fastpeft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")


def tiny_base(name_or_path: str | None = None):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if name_or_path is not None:
        model.config._name_or_path = name_or_path
        model.name_or_path = name_or_path
    return model.eval()


def peft_adapter_folder(path, seed: int, peft_config=None) -> str:
    """Save a peft adapter with random (non-zero) weights into ``path``."""
    base = tiny_base()
    torch.manual_seed(seed)  # after tiny_base, which seeds itself
    config = peft_config or peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(path)
    return os.fspath(path)


def cache_repo(cache_dir, repo_id: str, folder: str, commit: str, refs: tuple[str, ...] = ("main",),
               subfolder: str | None = None) -> None:
    """Lay out ``folder``'s files as huggingface_hub's cache holds a downloaded repo snapshot."""
    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit, subfolder or "")
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)


COMMIT_1, COMMIT_2 = "1" * 40, "2" * 40
IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache with "someone/lora" at main (seed 1) and at tag v2 (seed 2, under the subfolder "sub"),
    "someone/ia3" (an IA3 adapter) and "someone/model" (no adapter in it); every load is offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set both
    cache = tmp_path / "cache"
    cache_repo(cache, "someone/lora", peft_adapter_folder(tmp_path / "a1", 1), COMMIT_1)
    cache_repo(cache, "someone/lora", peft_adapter_folder(tmp_path / "a2", 2), COMMIT_2, refs=("v2",),
               subfolder="sub")
    ia3 = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                         init_ia3_weights=False)
    cache_repo(cache, "someone/ia3", peft_adapter_folder(tmp_path / "ia3", 3, ia3), COMMIT_1)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    cache_repo(cache, "someone/model", os.fspath(tmp_path / "model"), COMMIT_1)
    return os.fspath(cache)


def test_from_pretrained_by_repo_id_matches_peft(hub_cache):
    ours = fastpeft.PeftModel.from_pretrained(tiny_base(), "someone/lora", cache_dir=hub_cache)
    ref = peft.PeftModel.from_pretrained(tiny_base(), "someone/lora", cache_dir=hub_cache)
    assert not torch.equal(logits(ref), logits(tiny_base()))  # the adapter does something
    torch.testing.assert_close(logits(ours), logits(ref), rtol=1e-5, atol=1e-6)


def test_revision_and_subfolder_pick_that_snapshot(hub_cache, tmp_path):
    ours = fastpeft.PeftModel.from_pretrained(tiny_base(), "someone/lora", cache_dir=hub_cache, revision="v2",
                                              subfolder="sub")
    # peft 0.21 offline joins the subfolder twice (sub/sub/adapter_model.safetensors): it reads the folder itself
    ref = peft.PeftModel.from_pretrained(tiny_base(), os.fspath(tmp_path / "a2"))
    main = peft.PeftModel.from_pretrained(tiny_base(), "someone/lora", cache_dir=hub_cache)
    assert not torch.allclose(logits(ref), logits(main))
    torch.testing.assert_close(logits(ours), logits(ref), rtol=1e-5, atol=1e-6)
    # the commit hash names the same snapshot as the tag
    by_commit = fastpeft.PeftModel.from_pretrained(tiny_base(), "someone/lora", cache_dir=hub_cache,
                                                   revision=COMMIT_2, subfolder="sub")
    torch.testing.assert_close(logits(by_commit), logits(ref), rtol=1e-5, atol=1e-6)


def test_load_adapter_and_config_by_repo_id(hub_cache, tmp_path):
    ours = fastpeft.PeftModel.from_pretrained(tiny_base(), "someone/lora", cache_dir=hub_cache)
    ours.load_adapter("someone/lora", adapter_name="v2", cache_dir=hub_cache, revision="v2", subfolder="sub")
    ref = peft.PeftModel.from_pretrained(tiny_base(), "someone/lora", cache_dir=hub_cache)
    ref.load_adapter(os.fspath(tmp_path / "a2"), adapter_name="v2")  # peft: see the test above
    for name in ("default", "v2"):
        ours.set_adapter(name)
        ref.set_adapter(name)
        torch.testing.assert_close(logits(ours), logits(ref), rtol=1e-5, atol=1e-6)
    config = fastpeft.LoraConfig.from_pretrained("someone/lora", cache_dir=hub_cache)
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (4, 8, ["q_proj", "v_proj"])


def test_other_method_by_repo_id_matches_peft(hub_cache):
    ours = fastpeft.PeftModel.from_pretrained(tiny_base(), "someone/ia3", cache_dir=hub_cache)
    ref = peft.PeftModel.from_pretrained(tiny_base(), "someone/ia3", cache_dir=hub_cache)
    assert type(ours).__name__ == "IA3PeftModel"
    assert not torch.allclose(logits(ref), logits(tiny_base()))
    torch.testing.assert_close(logits(ours), logits(ref), rtol=1e-5, atol=1e-6)
    assert fastpeft.IA3Config.from_pretrained("someone/ia3", cache_dir=hub_cache).target_modules


def test_prompt_learning_load_adapter_by_repo_id(hub_cache, tmp_path):
    config = dict(num_virtual_tokens=4, task_type="CAUSAL_LM")
    cache_repo(hub_cache, "someone/pt", peft_adapter_folder(tmp_path / "pt", 7, peft.PromptTuningConfig(**config)),
               COMMIT_1)
    ours = fastpeft.get_peft_model(tiny_base(), fastpeft.PromptTuningConfig(**config)).eval()
    before = logits(ours)
    ours.load_adapter("someone/pt", "default", cache_dir=hub_cache)
    ref = peft.PeftModel.from_pretrained(tiny_base(), "someone/pt", cache_dir=hub_cache)
    assert not torch.allclose(logits(ref), before)
    torch.testing.assert_close(logits(ours), logits(ref), rtol=1e-5, atol=1e-6)


def test_auto_peft_model_by_repo_id(hub_cache, tmp_path):
    base_dir = tmp_path / "base"
    tiny_base().save_pretrained(base_dir)
    folder = peft_adapter_folder(tmp_path / "a3", 4)
    import json

    config_file = os.path.join(folder, "adapter_config.json")
    config = json.load(open(config_file))
    config["base_model_name_or_path"] = os.fspath(base_dir)
    json.dump(config, open(config_file, "w"))
    cache_repo(hub_cache, "someone/auto", folder, COMMIT_1)
    ours = fastpeft.AutoPeftModelForCausalLM.from_pretrained("someone/auto", cache_dir=hub_cache)
    ref = peft.AutoPeftModelForCausalLM.from_pretrained("someone/auto", cache_dir=hub_cache)
    torch.testing.assert_close(logits(ours), logits(ref), rtol=1e-5, atol=1e-6)


def test_auto_peft_model_loads_the_base_at_the_configs_revision(tmp_path, monkeypatch):
    """adapter_config.json's ``revision`` is the base model's: peft's AutoPeftModel loads the base at it (the
    ``revision`` keyword names the adapter's own)."""
    import json

    base_dir = tmp_path / "base"
    tiny_base().save_pretrained(base_dir)
    folder = peft_adapter_folder(tmp_path / "a", 4, peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                    task_type="CAUSAL_LM"))
    config_file = os.path.join(folder, "adapter_config.json")
    config = json.load(open(config_file))
    config.update(base_model_name_or_path=os.fspath(base_dir), revision="base-v1")
    json.dump(config, open(config_file, "w"))
    asked = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):  # a local base has no revisions: record the one asked, load it
        asked.append(kwargs.pop("revision", None))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    peft.AutoPeftModelForCausalLM.from_pretrained(folder)
    fastpeft.AutoPeftModelForCausalLM.from_pretrained(folder)
    assert asked == ["base-v1", "base-v1"]


def test_one_weights_file_is_downloaded(tmp_path, monkeypatch):
    """A repo holding both adapter_model.safetensors and adapter_model.bin: only the safetensors file is
    fetched (peft fetches one file too); a repo with the pickle alone gets the pickle."""
    from huggingface_hub.utils import filter_repo_objects

    both = peft_adapter_folder(tmp_path / "both", 1)
    peft.PeftModel.from_pretrained(tiny_base(), both).save_pretrained(tmp_path / "pickle", safe_serialization=False)
    shutil.copy(tmp_path / "pickle" / "adapter_model.bin", os.path.join(both, "adapter_model.bin"))
    os.remove(tmp_path / "pickle" / "README.md")
    repos = {"someone/both": both, "someone/pickle": os.fspath(tmp_path / "pickle")}
    fetched = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):  # the Hub and its cache, on disk
        snapshot = tmp_path / "snapshots" / repo_id
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects(sorted(os.listdir(repos[repo_id])), allow_patterns=allow_patterns):
            if not (snapshot / name).exists():
                fetched.append((repo_id, name))
                shutil.copy(os.path.join(repos[repo_id], name), snapshot / name)
        return os.fspath(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    ours = fastpeft.PeftModel.from_pretrained(tiny_base(), "someone/both")
    assert sorted(fetched) == [("someone/both", "adapter_config.json"), ("someone/both", "adapter_model.safetensors")]
    fetched.clear()
    from_pickle = fastpeft.PeftModel.from_pretrained(tiny_base(), "someone/pickle", allow_pickle=True)
    assert sorted(fetched) == [("someone/pickle", "adapter_config.json"), ("someone/pickle", "adapter_model.bin")]
    torch.testing.assert_close(logits(from_pickle), logits(ours), rtol=1e-5, atol=1e-6)


def test_errors_name_both_places(hub_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastpeft.PeftModel.from_pretrained(tiny_base(), os.fspath(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(FileNotFoundError, match="not a local adapter folder.*Hub repo 'someone/missing'"):
        fastpeft.PeftModel.from_pretrained(tiny_base(), "someone/missing", cache_dir=hub_cache)
    with pytest.raises(FileNotFoundError, match="revision 'v9'"):
        fastpeft.PeftModel.from_pretrained(tiny_base(), "someone/lora", cache_dir=hub_cache, revision="v9")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json.*not a peft adapter"):
        fastpeft.PeftModel.from_pretrained(tiny_base(), "someone/model", cache_dir=hub_cache)
    with pytest.raises(FileNotFoundError, match="no subfolder 'nope'"):
        fastpeft.PeftModel.from_pretrained(tiny_base(), peft_adapter_folder(tmp_path / "local", 5),
                                           subfolder="nope")


def card_data(folder):
    return huggingface_hub.ModelCard.load(os.path.join(folder, "README.md")).data


def test_save_pretrained_writes_peft_model_card(tmp_path):
    config_kwargs = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ours = fastpeft.get_peft_model(tiny_base("org/base"), fastpeft.LoraConfig(**config_kwargs))
    ours.save_pretrained(tmp_path / "ours")
    ref = peft.get_peft_model(tiny_base("org/base"), peft.LoraConfig(**config_kwargs))
    ref.save_pretrained(tmp_path / "ref")
    mine, theirs = card_data(tmp_path / "ours"), card_data(tmp_path / "ref")
    for key in ("library_name", "base_model", "pipeline_tag"):
        assert mine.get(key) == theirs.get(key), key
    assert set(theirs.tags) <= set(mine.tags) and "fastpeft" in mine.tags
    # a card the user wrote keeps its text; saving again adds nothing twice
    readme = tmp_path / "ours" / "README.md"
    readme.write_text("---\nlicense: mit\n---\n\n# My adapter\n\nTrained on my data.\n")
    ours.save_pretrained(tmp_path / "ours")
    ours.save_pretrained(tmp_path / "ours")
    text = readme.read_text()
    assert "Trained on my data." in text and text.count(f"- fastpeft {fastpeft.__version__}") == 1
    data = card_data(tmp_path / "ours")
    assert (data.license, data.library_name, data.base_model) == ("mit", "peft", "org/base")


def test_card_names_no_local_folder_as_base_model(tmp_path):
    """A base read from a local folder has that path as its name: like transformers' model cards (which take
    ``_name_or_path`` only when it is not a directory), the card does not put it in ``base_model``, which the
    Hub checks on upload against its model ids (push_to_hub would be refused)."""
    tiny_base().save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert os.path.isdir(base.config._name_or_path)
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "out")
    data = card_data(tmp_path / "out")
    assert data.library_name == "peft" and data.get("base_model") is None
    assert not [t for t in data.tags if t.startswith("base_model:")]


def test_save_pretrained_card_for_other_methods(tmp_path):
    model = fastpeft.get_peft_model(tiny_base("org/base"), fastpeft.IA3Config(target_modules=["k_proj"],
                                                                              feedforward_modules=[]))
    model.save_pretrained(tmp_path)
    data = card_data(tmp_path)
    assert (data.library_name, data.base_model) == ("peft", "org/base") and "ia3" in data.tags


@pytest.mark.parametrize("method", ["PrefixTuningConfig", "PromptTuningConfig"])
def test_prompt_learning_save_pretrained_writes_the_card_like_peft(tmp_path, method):
    config = dict(num_virtual_tokens=4, task_type="CAUSAL_LM")
    ours = fastpeft.get_peft_model(tiny_base("org/base"), getattr(fastpeft, method)(**config))
    ref = peft.get_peft_model(tiny_base("org/base"), getattr(peft, method)(**config))
    ours.save_pretrained(tmp_path / "ours")  # push_to_hub uploads what save_pretrained writes
    ref.save_pretrained(tmp_path / "ref")
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "ref"))
    mine, theirs = card_data(tmp_path / "ours"), card_data(tmp_path / "ref")
    for key in ("library_name", "base_model", "pipeline_tag"):
        assert mine.get(key) == theirs.get(key), key


def test_push_to_hub_uploads_the_adapter_only(tmp_path, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls["create_repo"] = (repo_id, private, exist_ok)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, create_pr=False, **kwargs):
        calls["upload"] = (repo_id, commit_message, revision, create_pr)
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return "commit-info"

    def no_readme(self, repo_id, filename, **kwargs):  # a new repo: no README.md yet
        raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id} has no {filename}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "hf_hub_download", no_readme)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", lambda *a, **k: pytest.fail("no branch asked"))
    torch.manual_seed(7)
    model = fastpeft.get_peft_model(tiny_base("org/base"), fastpeft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    with torch.no_grad():
        for _, layer in model.base_model.lora_layers():
            layer.lora_B["default"].weight.normal_()
    assert model.push_to_hub("me/my-lora", private=True, tags=["chat"]) == "commit-info"
    assert calls["create_repo"] == ("me/my-lora", True, True)
    assert calls["upload"] == ("me/my-lora", "Upload adapter with fastpeft", None, False)
    uploaded = tmp_path / "uploaded"
    assert sorted(os.listdir(uploaded)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file

    keys = load_file(uploaded / "adapter_model.safetensors")
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert "chat" in card_data(uploaded).tags
    ref = peft.PeftModel.from_pretrained(tiny_base(), os.fspath(uploaded))
    torch.testing.assert_close(logits(model.eval()), logits(ref), rtol=1e-5, atol=1e-6)


def test_push_to_hub_keeps_the_repos_own_card(tmp_path, monkeypatch):
    """A repo whose README.md its owner wrote on the Hub: the pushed card keeps that text and metadata (as
    transformers' push_to_hub, which peft's uses, does) and gains peft's fields."""
    remote = tmp_path / "remote_README.md"
    remote.write_text("---\nlicense: mit\n---\n\n# My adapter\n\nWritten on the Hub.\n")
    asked = {}

    def hf_hub_download(self, repo_id, filename, revision=None, **kwargs):
        asked["readme"] = (repo_id, filename, revision)
        return os.fspath(remote)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "uploaded")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **k: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = fastpeft.get_peft_model(tiny_base("org/base"), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.push_to_hub("me/my-lora", revision="dev", tags=["chat"])
    assert asked["readme"] == ("me/my-lora", "README.md", "dev")
    text = (tmp_path / "uploaded" / "README.md").read_text()
    assert "Written on the Hub." in text and "# Adapter" not in text
    data = card_data(tmp_path / "uploaded")
    assert (data.license, data.library_name, data.base_model) == ("mit", "peft", "org/base")
    assert {"chat", "lora"} <= set(data.tags)


def _forbidden(*args, **kwargs):
    import importlib

    # the HTTP client huggingface_hub's errors are built on (httpx for hub 1.x, httpx2 for 2.x; requests before 1.0,
    # and no longer installed with it)
    response_type = getattr(huggingface_hub.errors, "Response", None)
    if response_type is None:  # hub < 1.0: requests
        import requests

        response = requests.Response()
        response.status_code = 403
    else:
        client = importlib.import_module(response_type.__module__.split(".")[0])
        url = "https://huggingface.co/api/repos/me/my-lora/branch"
        response = client.Response(403, request=client.Request("POST", url))
    raise huggingface_hub.errors.HfHubHTTPError("403 Forbidden: no write access", response=response)


@pytest.mark.parametrize("revision, create_pr, create_branch, branch_made, error", [
    ("dev", False, None, "dev", None),
    ("dev", True, None, "dev", None),  # a PR against a new branch: the branch is made first (transformers too)
    ("refs/pr/3", False, None, None, None),  # adding to an open PR: its ref exists, no branch to make
    (None, True, None, None, None),
    ("dev", True, _forbidden, None, None),  # a PR to someone else's repo: no right to branch, the branch must exist
    ("dev", False, _forbidden, None, huggingface_hub.errors.HfHubHTTPError),
])
def test_push_to_hub_branches_like_transformers(tmp_path, monkeypatch, revision, create_pr, create_branch,
                                                branch_made, error):
    made, uploaded = [], {}

    def record_branch(self, repo_id, branch, exist_ok=False, **kwargs):
        assert exist_ok
        made.append(branch)

    def upload_folder(self, repo_id, folder_path, revision=None, create_pr=False, **kwargs):
        uploaded.update(revision=revision, create_pr=create_pr)

    def no_readme(self, repo_id, filename, **kwargs):
        raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id} has no {filename}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **k: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch or record_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "hf_hub_download", no_readme)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = fastpeft.get_peft_model(tiny_base("org/base"), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    if error is not None:
        with pytest.raises(error, match="403"):
            model.push_to_hub("me/my-lora", revision=revision, create_pr=create_pr)
        assert uploaded == {}
        return
    model.push_to_hub("me/my-lora", revision=revision, create_pr=create_pr)
    assert made == ([branch_made] if branch_made else [])
    assert uploaded == {"revision": revision, "create_pr": create_pr}
