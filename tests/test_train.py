"""``fastpeft train`` / ``generate`` / ``estimate``: the data recipe, a short run, resume, bad data, Trainer."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import fastpeft
from fastpeft import cli
from fastpeft.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    Collator,
    DataError,
    Sample,
    auto_max_length,
    default_task,
    read_records,
    tokenize,
)
from fastpeft.train import parse_args, train

TINY = "".join(json.dumps({"prompt": f"upper: w{i} =", "response": f" W{i}"}) + "\n" for i in range(8))

TOK = ByteTokenizer()


# ----------------------------------------------------------------------------- data recipe
def test_tokenize_masks_the_prompt_and_appends_eos():
    [s] = tokenize([{"prompt": "ab", "response": "cd"}], TOK, max_length=16)
    assert s.input_ids == [TOK.bos_token_id, 97, 98, 99, 100, TOK.eos_token_id]
    assert s.labels == [IGNORE_INDEX] * 3 + [99, 100, TOK.eos_token_id]
    [t] = tokenize([{"text": "xy"}], TOK, max_length=16)
    assert t.input_ids == t.labels == [TOK.bos_token_id, 120, 121, TOK.eos_token_id]


def test_tokenize_truncates_the_response_and_refuses_a_prompt_that_fills_the_length():
    [s] = tokenize([{"prompt": "ab", "response": "cdefgh"}], TOK, max_length=6)
    assert len(s.input_ids) == 6 and s.labels[:3] == [IGNORE_INDEX] * 3 and s.labels[3:] == [99, 100, 101]
    with pytest.raises(DataError, match=r"data\.jsonl:7: the prompt alone has 6 tokens"):
        tokenize([{"prompt": "abcde", "response": "x", "_line": 7}], TOK, max_length=6, source="data.jsonl")


def test_collator_pads_to_the_longest_sorts_and_masks():
    batch = [Sample([1, 2], [IGNORE_INDEX, 2]), Sample([3, 4, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, 5, 6])]
    out = Collator(pad_token_id=0)(batch)
    assert out["input_ids"].tolist() == [[3, 4, 5, 6], [1, 2, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 5, 6], [-100, 2, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert Collator(0, pad_to_multiple_of=8)(batch)["input_ids"].shape == (2, 8)


def test_auto_max_length_is_one_and_a_half_times_the_mean():
    rows = [{"prompt": "a" * 9, "response": ""}] * 10  # bos + 9 + eos = 11 tokens
    assert auto_max_length(rows, TOK) == round(1.5 * 11)


def test_default_task_splits_are_disjoint():
    train_rows, eval_rows = default_task()
    assert len(train_rows) == 4000 and len(eval_rows) == 200
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}
    r = train_rows[0]
    word = r["prompt"].removeprefix("upper: ").removesuffix(" =")
    assert word.islower() and r["response"] == " " + word.upper()


@pytest.mark.parametrize("content,match", [
    (b"", "no samples"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', r":2: field\(s\) \['response'\] missing"),
    (b'{"prompt": "a", "response": "b"}\n\xff\xfe\n', r":2: not valid UTF-8"),
    (b'{"prompt": "a", "response": "b"}\n{oops\n', r":2: invalid JSON"),
    (b'{"question": "a"}\n', r":1: needs string fields 'prompt' and 'response'"),
    (b'{"text": "ab"}\n{"text": ""}\n', r":2: empty text sample"),
])
def test_bad_data_names_the_line(tmp_path, content, match):
    f = tmp_path / "data.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_records(f)


def test_json_arrays_trl_completions_and_alpaca_records(tmp_path):
    rows = [{"prompt": "p", "completion": " c"},  # TRL's prompt-completion
            {"instruction": "Add.", "input": "2 and 2", "output": "4"},  # Stanford Alpaca, with an input
            {"instruction": "Greet.", "input": "", "output": "Hi"},
            {"text": "plain"}]
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows, indent=2))  # one pretty-printed JSON array, as alpaca_data.json
    lines = tmp_path / "d.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = read_records(array)
    assert [{k: v for k, v in r.items() if not k.startswith("_")} for r in read] == \
        [{k: v for k, v in r.items() if not k.startswith("_")} for r in read_records(lines)]
    assert (read[0]["prompt"], read[0]["response"]) == ("p", " c")
    assert read[1]["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
        "### Input:\n2 and 2\n\n### Response:\n") and read[1]["response"] == "4"
    assert read[2]["prompt"] == ("Below is an instruction that describes a task. Write a response that appropriately "
                                 "completes the request.\n\n### Instruction:\nGreet.\n\n### Response:\n")
    assert read[3] == {"text": "plain", "_line": 4, "_where": f"{array}: item 3"}
    # errors name the array item, in reading and in tokenizing
    array.write_text(json.dumps(rows[:1] + [{"instruction": "x", "output": 3}]))
    with pytest.raises(DataError, match=r"d\.json: item 1: Alpaca field\(s\) \['output'\] not a string"):
        read_records(array)
    array.write_text(json.dumps([{"prompt": "p" * 20, "response": "r"}]))
    with pytest.raises(DataError, match=r"d\.json: item 0: the prompt alone has 21 tokens"):
        tokenize(read_records(array), TOK, max_length=8, source=str(array))


def test_over_long_row_is_refused_by_the_command(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    rows = [{"prompt": "p" * 5, "response": "r"}] * 30 + [{"prompt": "q" * 200, "response": "r"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = cli.main(["train", "--data", str(f), "--max-length", "64", "--max-steps", "1", "--output",
                     str(tmp_path / "o"), "--no-progress", "--eval-split", "0"])
    assert code == 2
    assert "d.jsonl:31: the prompt alone has 201 tokens" in capsys.readouterr().err


def test_config_file_keys_mirror_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-steps: 7\nlr: 0.5\nr: 4\ntarget_modules: q_proj,v_proj\n")
    args = parse_args(["--config", str(cfg), "--lr", "0.25"])
    assert (args.max_steps, args.lr, args.r, args.target_modules) == (7, 0.25, 4, "q_proj,v_proj")
    cfg.write_text('{"no_such_flag": 1}')
    with pytest.raises(SystemExit, match="no_such_flag"):
        parse_args(["--config", str(cfg)])


@pytest.mark.parametrize("text,key,match", [
    ("method: foo\n", "method", "expected one of lora"),
    ("dtype: fp64\n", "dtype", "expected one of auto"),
    ("batch_size: 2.5\n", "batch_size", "expected an integer, got 2.5"),
    ("batch_size: [1, 2]\n", "batch_size", r"expected an integer, got \[1, 2\]"),
    ("batch_size: two\n", "batch_size", "expected an integer, got 'two'"),
    ("load_in_4bit: maybe\n", "load_in_4bit", "expected true or false"),
    ("load_in_4bit: 1\n", "load_in_4bit", "expected true or false"),
    ("resume: 3\n", "resume", "expected true, false or a checkpoint folder"),
])
def test_config_values_are_checked_like_flags(tmp_path, text, key, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit, match=rf"c\.yaml: {key}: {match}"):
        parse_args(["--config", str(cfg)])


def test_config_values_convert_like_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text('load_in_4bit: "false"\nuse_rslora: "true"\nresume: true\nlr: 2e-4\nmax_length: 64\n'
                   "target_modules: [q_proj, v_proj]\nmethod_options: {init_r: 4}\n")
    args = parse_args(["--config", str(cfg)])
    assert args.load_in_4bit is False and args.use_rslora is True  # the string "false" is not truthy here
    assert args.resume == "auto" and args.lr == 2e-4  # YAML reads 2e-4 as a string
    assert args.max_length == "64" and args.target_modules == ["q_proj", "v_proj"]
    assert args.method_options == {"init_r": 4}
    cfg.write_text("resume: false\n")
    assert parse_args(["--config", str(cfg)]).resume is None
    cfg.write_text("lr: [\n")
    with pytest.raises(SystemExit, match=r"c\.yaml: not valid YAML at line 2"):
        parse_args(["--config", str(cfg)])
    bad = tmp_path / "c.json"
    bad.write_text('{"lr": 1e-3,}')
    with pytest.raises(SystemExit, match=r"c\.json: not valid JSON at line 1, column 13"):
        parse_args(["--config", str(bad)])


@pytest.mark.parametrize("flags,match", [
    (["--batch-size", "0"], "--batch-size must be an integer ≥ 1, got 0"),
    (["--batch-size", "-1"], "--batch-size must be an integer ≥ 1"),
    (["--grad-accum", "0"], "--grad-accum must be an integer ≥ 1"),
    (["--eval-split", "1"], r"--eval-split must be in \[0, 1\)"),
    (["--eval-split", "-0.1"], r"--eval-split must be in \[0, 1\)"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--max-length", "12.5"], "--max-length must be a positive integer or auto"),
    (["--max-length", "0"], "--max-length must be a positive integer or auto"),
    (["--max-steps", "0"], r"--max-steps must be ≥ 1 \(or -1: not set\)"),
    (["--max-steps", "-2"], r"--max-steps must be ≥ 1"),
    (["--warmup-ratio", "1.5"], r"--warmup-ratio must be in \[0, 1\]"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device"),
    (["--device", "cuda:99"] if torch.cuda.is_available() else ["--device", "cuda"], "--device 'cuda"),
    (["--method-options", "{bad"], "--method-options is not valid JSON"),
    (["--method-options", "[1]"], "--method-options must be a JSON object"),
    (["--method-options", '{"no_such": 1}'], "--method lora with --method-options .*no_such"),
    (["--method", "ia3", "--method-options", '{"no_such": 1}'], "--method ia3 with --method-options .*no_such"),
    (["--r", "0"], "--r must be an integer ≥ 1"),
    (["--lora-dropout", "1.5"], r"--lora-dropout must be in \[0, 1\]"),
    (["--lora-dropout", "-0.5"], r"--lora-dropout must be in \[0, 1\]"),
    (["--target-modules", "nope"], "--target-modules 'nope': Target modules .* not found"),
    (["--data", "missing.jsonl"], None),
    (["--resume", "--overwrite-output-dir"], "contradict"),
    # aLoRA data that cannot train: no sample holds the invocation; packing would activate only the last sample
    (["--method-options", json.dumps({"alora_invocation_tokens": [1, 2, 3]})], "no training sample contains"),
    (["--packing", "--method-options", json.dumps({"alora_invocation_tokens": [32, 61]})],
     "--packing cannot be used with an aLoRA adapter"),
    (["--method", "prefix", "--gradient-checkpointing"], "--method prefix cannot use --gradient-checkpointing"),
    (["--batch-size", "64", "--grad-accum", "2"], r"samples give no full step of batch 64 × grad-accum 2"),
])
def test_bad_flags_fail_before_anything_is_built_or_written(tmp_path, flags, match):
    data = tmp_path / "d.jsonl"
    data.write_text(TINY)
    out = tmp_path / "o"
    args = parse_args(["--data", str(data), "--eval-split", "0", "--batch-size", "4", "--max-steps", "1",
                       "--output", str(out), "--no-progress", *flags])
    if match is None:  # a missing --data file: reported before the model is built
        with pytest.raises(DataError, match="does not exist"):
            train(args)
    else:
        with pytest.raises(SystemExit, match=match):
            train(args)
    assert not out.exists()  # no output folder, no base_model/: nothing was built


def test_max_steps_minus_one_means_not_set(tmp_path):
    from fastpeft.train import check_args

    args = parse_args(["--max-steps", "-1", "--epochs", "2"])
    check_args(args)
    assert args.max_steps is None and args.epochs == 2


def test_modules_to_save_reaches_every_method():
    from fastpeft.train import build_default_model, build_peft_model

    for method in ("ia3", "prompt", "adalora", "bitfit"):
        with torch.device("meta"):
            model = build_peft_model(build_default_model(), parse_args(["--method", method, "--modules-to-save",
                                                                        "lm_head"]), total_steps=100)
        trained = [n for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n]
        assert trained, method
        assert model.peft_config["default"].modules_to_save == ["lm_head"], method


class _TinyModel(torch.nn.Linear):
    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        torch.save(self.state_dict(), os.path.join(path, "w.pt"))


def test_save_checkpoint_keeps_the_one_it_wrote_and_writes_atomically(tmp_path):
    from fastpeft.train import checkpoints, save_checkpoint

    model = _TinyModel(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    (tmp_path / "checkpoint-50").mkdir()  # a higher step from elsewhere used to win the cleanup
    (tmp_path / "checkpoint-notastep").mkdir()
    ckpt = save_checkpoint(model, opt, tmp_path, 3, 0, 1, {"args": {}}, limit=1, tok=TOK)
    assert [p.name for _, p in checkpoints(tmp_path)] == ["checkpoint-3"]
    assert (ckpt / "trainer_state.pt").is_file() and (ckpt / "train_log.json").is_file()
    assert (ckpt / "fastpeft_tokenizer.json").is_file()
    assert not list(tmp_path.glob(".checkpoint-*"))  # written under a temporary name, then renamed


def test_restore_refuses_other_shapes_except_adalora_ranks():
    from fastpeft.train import _restore

    lin = torch.nn.Linear(2, 4)
    state = {"tensors": {"weight": torch.zeros(8, 2), "bias": torch.zeros(4)}}
    with pytest.raises(SystemExit, match=r"'weight' has shape \(8, 2\), this model's \(4, 2\).*same --method"):
        _restore(lin, state, "lora")
    with pytest.raises(SystemExit, match="the checkpoint lacks 'bias'"):
        _restore(lin, {"tensors": {"weight": torch.zeros(4, 2)}}, "lora")
    holder = torch.nn.Module()
    holder.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 4, bias=False)})
    _restore(holder, {"tensors": {"lora_A.default.weight": torch.ones(3, 2)}}, "adalora")  # pruned rank
    assert holder.lora_A["default"].weight.shape == (3, 2)


def test_grad_accum_equals_one_batch_of_all_its_tokens(tmp_path):
    """batch 4 × grad-accum 2 takes the same steps as batch 8: micro-batches weighted by their target tokens (as
    transformers' Trainer does with num_items_in_batch), not a mean of per-micro-batch means."""
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r" * (1 + i % 7)}) + "\n" for i in range(32)))
    logs, adapters = [], []
    for name, flags in (("b8", ["--batch-size", "8"]), ("b4x2", ["--batch-size", "4", "--grad-accum", "2"])):
        result = train(parse_args(["--data", str(f), "--eval-split", "0", "--max-steps", "2", "--lora-dropout", "0",
                                   "--max-grad-norm", "0", "--eval-generate", "0", "--output", str(tmp_path / name),
                                   "--no-progress", *flags]))
        logs.append([s["loss"] for s in result.log["steps"]])
        from safetensors.torch import load_file

        adapters.append(load_file(tmp_path / name / "adapter_model.safetensors"))
    assert logs[0] == pytest.approx(logs[1], abs=2e-5)
    for k in adapters[0]:
        torch.testing.assert_close(adapters[0][k], adapters[1][k], rtol=0, atol=1e-4)
    # without clipping the gradient norm is still measured
    assert all(s["grad_norm"] > 0 for s in result.log["steps"])


def test_eval_data_replaces_the_embedded_held_out_set(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"upper: w{i} =", "response": f" W{i}"}) + "\n" for i in range(3)))
    result = train(parse_args(["--eval-data", str(f), "--max-steps", "1", "--eval-generate", "0", "--output",
                               str(tmp_path / "o"), "--no-progress"]))
    assert result.log["eval_samples"] == 3
    from fastpeft.data import DataError

    with pytest.raises(DataError, match="does not exist"):
        train(parse_args(["--eval-data", str(tmp_path / "missing.jsonl"), "--max-steps", "1", "--output",
                          str(tmp_path / "p"), "--no-progress"]))


def test_bench_refuses_providers_of_another_preset_and_infinite_alpha(capsys):
    with pytest.raises(SystemExit, match="do not belong to the tiny preset"):
        cli.main(["bench", "--preset", "tiny", "--providers", "bnb_gemv_4bit"])
    with pytest.raises(SystemExit, match="--lora-alpha must be a finite number"):
        cli.main(["bench", "--preset", "tiny", "--lora-alpha", "inf"])
    from fastpeft.cli import _bench

    class Stop(Exception):
        pass

    import fastpeft.cli as cli_module

    def stop(args, preset, device):  # the e2e run itself is not needed: only what --plot became
        raise Stop(args.plot)

    original, cli_module._bench_e2e = cli_module._bench_e2e, stop
    try:
        with pytest.raises(Stop) as stopped:
            _bench(cli.build_parser().parse_args(["bench", "--preset", "e2e-tiny", "--plot", "x.png"]))
    finally:
        cli_module._bench_e2e = original
    assert stopped.value.args == (None,)
    assert "no plot for the e2e presets" in capsys.readouterr().err


def test_output_folder_of_an_earlier_run_and_resume_checks(tmp_path, capsys):
    """Checkpoints of an earlier run refuse a new run; --resume refuses a checkpoint at/after the last step or
    saved with other adapter options, falls back past an unreadable latest one; a checkpoint generates."""
    data = tmp_path / "d.jsonl"
    data.write_text(TINY)
    out = tmp_path / "o"

    def run(*flags):
        return train(parse_args(["--data", str(data), "--eval-split", "0", "--batch-size", "4", "--output", str(out),
                                 "--no-progress", "--save-steps", "1", *flags]))

    run("--max-steps", "3")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    adapter = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="holds checkpoints of an earlier run.*--resume.*--overwrite-output-dir"):
        run("--max-steps", "2")
    with pytest.raises(SystemExit, match="checkpoint-2: it is at step 2, and this run has 2 steps"):
        run("--max-steps", "2", "--resume")
    with pytest.raises(SystemExit, match="trained with --r 16, this run has --r 8.*same --method and options"):
        run("--max-steps", "3", "--resume", "--r", "8")
    with pytest.raises(SystemExit, match="--target-modules"):
        run("--max-steps", "3", "--resume", "--target-modules", "q_proj")
    with pytest.raises(SystemExit, match="trained with --init-lora-weights True, this run has --init-lora-weights "
                                         "'olora'"):  # an init that rewrites the base: another model
        run("--max-steps", "3", "--resume", "--init-lora-weights", "olora")
    with pytest.raises(SystemExit, match="--lora-dropout"):  # another dropout: another training run
        run("--max-steps", "3", "--resume", "--lora-dropout", "0.3")
    with pytest.raises(SystemExit, match="its base ran in float32, this run's in bfloat16"):  # another dtype
        run("--max-steps", "3", "--resume", "--dtype", "bf16")
    assert (out / "adapter_model.safetensors").read_bytes() == adapter  # nothing was overwritten
    # a checkpoint folder is an adapter `fastpeft generate` loads (base and tokenizer from the run folder)
    assert cli.main(["generate", "--adapter", str(out / "checkpoint-2"), "--prompt", "upper: w1 =",
                     "--max-new-tokens", "2"]) == 0
    assert "upper: w1 =" in capsys.readouterr().out
    # a truncated latest checkpoint (a kill mid-save by an older version): resume from the one before
    state = out / "checkpoint-2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    resumed = run("--max-steps", "3", "--resume", "--dtype", "fp32")  # what --dtype auto resolved to on a CPU
    assert resumed.log["resumed_from"].endswith("checkpoint-1")
    assert "checkpoint-2/trainer_state.pt is unreadable" in capsys.readouterr().err
    assert [s["step"] for s in resumed.log["steps"]] == [1, 2, 3]
    run("--max-steps", "1", "--overwrite-output-dir")
    assert not list(out.glob("checkpoint-*"))


# ----------------------------------------------------------------------------- runs
def _args(tmp_path, *extra):
    return parse_args(["--output", str(tmp_path / "run"), "--no-progress", *extra])


def test_short_default_run_lowers_the_loss_and_peft_loads_the_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    result = train(_args(tmp_path, "--max-steps", "30", "--eval-steps", "30", "--eval-generate", "4"))
    out = result.output
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_log.json", "loss.png",
                 "base_model/model.safetensors", "fastpeft_tokenizer.json"):
        assert (out / name).is_file(), name
    log = json.loads((out / "train_log.json").read_text())
    first, last = log["evals"][0], log["evals"][-1]
    assert last["eval_loss"] < first["eval_loss"] - 1.0, (first, last)
    assert len(log["steps"]) == 30 and all("tokens_per_s" in s and "peak_mem_gb" in s for s in log["steps"])
    # the saved adapter loads in peft over the saved base and gives fastpeft's logits
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([TOK.encode("upper: abc =", add_special_tokens=True)])
    ours = result.model.eval()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_pissa_niter_adapter_reloads_to_the_trained_model(tmp_path):
    """--init-lora-weights pissa_niter_K: the randomized SVD would give another residual base at every load, so the
    run keeps its initial adapter and writes the final adapter and checkpoints converted to plain rank-2r LoRA on
    the original base: loaded by peft (and fastpeft) over base_model/, it gives the trained model's logits."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    result = train(_args(tmp_path, "--max-steps", "3", "--save-steps", "2", "--eval-generate", "0",
                         "--init-lora-weights", "pissa_niter_2"))
    out = result.output
    assert (out / "initial_adapter" / "adapter_model.safetensors").is_file()
    ids = torch.tensor([TOK.encode("upper: abc =", add_special_tokens=True)])
    with torch.no_grad():
        ref = result.model.eval()(input_ids=ids).logits
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 2 * 16
    for lib in (peft, fastpeft):
        loaded = lib.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
    ckpt = json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())
    assert ckpt["init_lora_weights"] is True and ckpt["r"] == 2 * 16


def test_resume_continues_from_the_same_step(tmp_path):
    common = ["--max-steps", "6", "--eval-steps", "3", "--eval-generate", "0", "--lora-dropout", "0.1"]
    full = train(parse_args(["--output", str(tmp_path / "a"), "--no-progress", *common]))
    # the same run with a checkpoint at step 3, then resumed from that checkpoint
    part2 = parse_args(["--output", str(tmp_path / "c"), "--no-progress", *common, "--save-steps", "3"])
    run_c = train(part2)
    assert (tmp_path / "c" / "checkpoint-3" / "trainer_state.pt").is_file()
    resumed = train(parse_args(["--output", str(tmp_path / "c"), "--no-progress", *common, "--resume"]))
    assert resumed.log["resumed_from"].endswith("checkpoint-3")
    steps = [s["step"] for s in resumed.log["steps"]]
    assert steps == [1, 2, 3, 4, 5, 6]
    # continuing from the checkpoint reproduces the uninterrupted run's losses and adapter
    la = [s["loss"] for s in full.log["steps"]]
    lc = [s["loss"] for s in resumed.log["steps"]]
    assert la == pytest.approx(lc, rel=1e-5)
    assert la == pytest.approx([s["loss"] for s in run_c.log["steps"]], rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    c = load_file(tmp_path / "c" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ptuning", "adalora"])
def test_resume_restores_any_method_exactly(tmp_path, method):
    """P-tuning's encoder and AdaLoRA's rank state are not in the saved adapter: the checkpoint carries them."""
    common = ["--method", method, "--max-steps", "6", "--eval-steps", "3", "--eval-generate", "0", "--lr", "1e-2"]
    full = train(parse_args(["--output", str(tmp_path / "a"), "--no-progress", *common]))
    train(parse_args(["--output", str(tmp_path / "c"), "--no-progress", *common, "--save-steps", "3"]))
    resumed = train(parse_args(["--output", str(tmp_path / "c"), "--no-progress", *common, "--resume"]))
    assert [s["loss"] for s in resumed.log["steps"]] == pytest.approx([s["loss"] for s in full.log["steps"]],
                                                                      rel=1e-5)


def test_grad_accum_takes_whole_groups_each_epoch(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(36)))
    result = train(parse_args(["--data", str(f), "--eval-split", "0", "--batch-size", "4", "--grad-accum", "2",
                               "--max-steps", "9", "--output", str(tmp_path / "o"), "--no-progress",
                               "--eval-generate", "0"]))
    # 9 batches an epoch, 4 whole groups of 2: every step sums exactly 2 micro-batches, across 3 epochs
    assert [s["micro_batches"] for s in result.log["steps"]] == [2] * 9
    with pytest.raises(SystemExit, match="no full step"):
        train(parse_args(["--data", str(f), "--eval-split", "0", "--batch-size", "32", "--grad-accum", "2",
                          "--max-steps", "1", "--output", str(tmp_path / "p"), "--no-progress"]))


def test_generate_command_reloads_base_and_adapter(tmp_path, capsys):
    train(_args(tmp_path, "--max-steps", "2", "--eval-generate", "0"))
    assert cli.main(["generate", "--adapter", str(tmp_path / "run"), "--prompt", "upper: abc =",
                     "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "upper: abc =" in out
    # a bf16 checkpoint under an adapter trained in fp32 loads in fp32 (the logged dtype); --dtype overrides
    from transformers import AutoModelForCausalLM

    from fastpeft import generate

    base_dir = tmp_path / "run" / "base_model"
    AutoModelForCausalLM.from_pretrained(base_dir).to(torch.bfloat16).save_pretrained(base_dir)
    model, _ = generate.load(str(tmp_path / "run"))
    assert {p.dtype for p in model.get_base_model().parameters()} == {torch.float32}
    model, _ = generate.load(str(tmp_path / "run"), dtype="bf16")
    assert next(model.get_base_model().model.embed_tokens.parameters()).dtype == torch.bfloat16
    (tmp_path / "run" / "train_log.json").unlink()
    model, _ = generate.load(str(tmp_path / "run"))  # no log: the checkpoint's own dtype
    assert next(model.get_base_model().model.embed_tokens.parameters()).dtype == torch.bfloat16


def test_generate_reloads_a_qlora_adapter_on_the_4bit_base(tmp_path, capsys):
    from fastpeft import generate
    from fastpeft.layers.lora4bit import FastLoraLinear4bit

    result = train(_args(tmp_path, "--method", "qlora", "--max-steps", "3", "--eval-generate", "0", "--lr", "1e-2"))
    trained = result.model.eval()
    ids = torch.tensor([TOK.encode("upper: abc =", add_special_tokens=True)])
    with torch.no_grad():
        expect = trained(input_ids=ids).logits
        model, _ = generate.load(str(tmp_path / "run"))  # 4-bit read from train_log.json
        assert any(isinstance(m, FastLoraLinear4bit) for m in model.modules())
        got = model(input_ids=ids).logits
        dense, _ = generate.load(str(tmp_path / "run"), load_in_4bit=False)
        assert not any(isinstance(m, FastLoraLinear4bit) for m in dense.modules())
        other = dense(input_ids=ids).logits
    err = (got - expect).abs().max().item()
    assert err < 1e-4 * expect.abs().max().item(), err  # the same model as at the end of training
    assert (other - expect).abs().max().item() > 10 * max(err, 1e-7)  # the unquantized base is another model
    assert cli.main(["generate", "--adapter", str(tmp_path / "run"), "--prompt", "upper: abc =",
                     "--max-new-tokens", "3", "--no-load-in-4bit"]) == 0
    assert "upper: abc =" in capsys.readouterr().out


def test_trainer_trains_a_fastpeft_model_unchanged(tmp_path):
    transformers = pytest.importorskip("transformers")
    import fastpeft
    from fastpeft.train import build_default_model

    model = fastpeft.get_peft_model(build_default_model(), fastpeft.LoraConfig(r=8, lora_alpha=16,
                                                                              target_modules="all-linear"))
    rows, _ = default_task(n_train=64, n_eval=0)
    samples = tokenize(rows, TOK, 34)
    collate = Collator(TOK.pad_token_id)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return {"input_ids": samples[i].input_ids, "labels": samples[i].labels}

    def collator(features):
        return collate([Sample(f["input_ids"], f["labels"]) for f in features])

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=16,
                                          max_steps=12, learning_rate=1e-2, logging_steps=1, report_to=[],
                                          save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DS(), data_collator=collator)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < losses[0], losses
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)
    model.save_pretrained(tmp_path / "adapter")
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """An untrained LoRA adapter on the embedded default, laid out as `fastpeft train` writes it."""
    import fastpeft
    from fastpeft.train import build_default_model

    folder = tmp_path_factory.mktemp("adapter")
    build_default_model().save_pretrained(folder / "base_model")
    model = fastpeft.get_peft_model(build_default_model(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(folder)
    TOK.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case,match", [
    ("bad_config", "adapter_config.json is not readable JSON"),
    ("no_weights", "has no adapter_model.safetensors"),
    ("corrupt_weights", "cannot load the adapter in .*SafetensorError"),
    ("wrong_rank", "cannot load the adapter in .*shape mismatch"),
    ("max_new_tokens", "--max-new-tokens must be ≥ 1"),
    ("no_model", "--model 'no/such/model' is not a local folder"),
    ("device", "--device 'nonsense' is not a device"),
])
def test_generate_user_mistakes_are_one_line_errors(tmp_path, saved_adapter, case, match):
    import shutil

    adapter = tmp_path / "a"
    shutil.copytree(saved_adapter, adapter)
    argv = ["generate", "--adapter", str(adapter), "--prompt", "x", "--max-new-tokens", "1"]
    if case == "bad_config":
        (adapter / "adapter_config.json").write_text("{bad")
    elif case == "no_weights":
        (adapter / "adapter_model.safetensors").unlink()
    elif case == "corrupt_weights":
        (adapter / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    elif case == "wrong_rank":
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    elif case == "max_new_tokens":
        argv[-1] = "0"
    elif case == "no_model":
        argv += ["--model", "no/such/model"]
    elif case == "device":
        argv += ["--device", "nonsense"]
    with pytest.raises(SystemExit, match=f"fastpeft generate: .*{match}") as exc:
        cli.main(argv)
    assert exc.value.code != 0 and "\n" not in str(exc.value.code)


@pytest.mark.parametrize("argv,match", [
    (["--batch-size", "0"], "--batch-size must be ≥ 1"),
    (["--seq-len", "-5"], "--seq-len must be ≥ 1"),
    (["--r", "0"], "--r must be ≥ 1"),
    (["--model", "no/such/model"], "--model 'no/such/model' is not a local folder"),
    (["--target-modules", "nope"], "Target modules"),
])
def test_estimate_user_mistakes_are_errors(argv, match):
    with pytest.raises(SystemExit, match=f"fastpeft estimate: {match}"):
        cli.main(["estimate", *argv])


# ----------------------------------------------------------------------------- estimate
def test_estimate_is_within_a_factor_of_two_of_the_measured_peak():
    from transformers import LlamaConfig

    from fastpeft.estimate import estimate, measure

    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    est = estimate(cfg, "lora", batch_size=8, seq_len=256, dtype=torch.float32)
    peak = measure(cfg, "lora", batch_size=8, seq_len=256, dtype=torch.float32)
    assert est.rule_of_thumb == 6 * 8 * est.params
    assert 0.5 <= est.total / peak <= 2.0, (est.as_gib(), peak / 2**30)


def test_estimate_full_fine_tuning_state_equals_a_real_adamw_step():
    """weights + gradients + AdamW moments, counted from the tensors a real fp32 step holds (each byte once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpeft.estimate import estimate

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    est = estimate(cfg, "full", batch_size=1, seq_len=4, dtype=torch.float32)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    moments = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")
    assert est.weights + est.trainable_state == sum(weights.values()) + grads + moments


def test_estimate_reads_the_named_config_file(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpeft.estimate import _config

    small = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    big = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    small.save_pretrained(tmp_path)  # config.json beside the file asked for
    (tmp_path / "big.json").write_text(big.to_json_string())
    got = _config(str(tmp_path / "big.json"))
    assert (got.hidden_size, got.num_hidden_layers) == (64, 3)
    assert sum(p.numel() for p in LlamaForCausalLM(got).parameters()) == \
        sum(p.numel() for p in LlamaForCausalLM(big).parameters())


def test_estimate_command_prints_components(capsys):
    assert cli.main(["estimate", "--batch-size", "2", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "rule of thumb" in out and "fastpeft estimate" in out


# ----------------------------------------------------------------------------- end-to-end benchmark
def test_e2e_bench_tiny_runs_and_writes_json(tmp_path):
    out = tmp_path / "e2e.json"
    assert cli.main(["bench", "--preset", "e2e-tiny", "--providers", "frozen", "peft", "fastpeft",
                     "--dropout", "0", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["provider"] for r in rows] == ["frozen", "peft", "fastpeft"]
    assert all(r["tokens_per_s"] > 0 and r["versions"]["torch"] for r in rows)
    assert "speedup_vs_peft" in rows[2]
    # same base and inputs, LoRA B = 0 at the start: the first step's loss is the frozen model's for all three
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], abs=1e-4)
    assert rows[2]["first_loss"] == pytest.approx(rows[1]["first_loss"], abs=1e-4)


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix", "bitfit", "freeze", "adapter", "ia3", "adalora",
                                    "qlora", "ln_tuning", "trainable_tokens"])
def test_every_method_trains_through_the_command(tmp_path, method):
    # trainable_tokens: the rows of the printable bytes (the embedded default's tokenizer is byte-level)
    extra = ["--method-options", json.dumps({"token_indices": list(range(32, 127))})] \
        if method == "trainable_tokens" else []
    result = train(_args(tmp_path, "--method", method, "--max-steps", "6", "--eval-steps", "6",
                         "--eval-generate", "0", "--lr", "1e-2", *extra))
    first, last = result.log["evals"][0]["eval_loss"], result.log["evals"][-1]["eval_loss"]
    assert last < first, (method, first, last)
    assert (result.output / "adapter_config.json").is_file()
    saved = json.loads((result.output / "adapter_config.json").read_text())
    expected = {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING", "bitfit": "BITFIT",
                "freeze": "FREEZE", "adapter": "BOTTLENECK", "ia3": "IA3", "adalora": "ADALORA", "qlora": "LORA",
                "ln_tuning": "LN_TUNING", "trainable_tokens": "TRAINABLE_TOKENS"}
    assert saved["peft_type"] == expected[method]


# ----------------------------------------------------------------------------- stopping on SIGINT / SIGTERM
def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("grad_accum, signum, at_call", [
    (1, "SIGTERM", 3),   # the signal arrives during step 3: that step completes, then checkpoint-3
    (2, "SIGINT", 5),    # during the first micro-batch of step 3: it is dropped, checkpoint-2, replayed on resume
])
def test_a_signal_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, grad_accum, signum, at_call):
    """A stopped run saves the last completed step (position and RNG as of that step), and --resume from it
    ends with the uninterrupted run's losses and adapter (dropout on, so the RNG state matters)."""
    import signal

    import fastpeft.train as train_module

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"upper: w{i} =", "response": f" W{i}"}) + "\n"
                            for i in range(48)))
    common = ["--data", str(data), "--eval-split", "0", "--max-steps", "6", "--grad-accum", str(grad_accum),
              "--batch-size", "4", "--lora-dropout", "0.1", "--save-steps", "100", "--no-progress"]
    full = train(parse_args(["--output", str(tmp_path / "a"), *common]))

    calls = {"n": 0}
    real_call = train_module.Collator.__call__

    def counting_call(self, batch):  # with no eval samples, every collator call is a training micro-batch
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), getattr(signal, signum))
        return real_call(self, batch)

    monkeypatch.setattr(train_module.Collator, "__call__", counting_call)
    code = cli.main(["train", "--output", str(tmp_path / "b"), *common])
    assert code == 128 + getattr(signal, signum)
    saved_step = 3 if grad_accum == 1 else 2
    assert [p.name for _, p in train_module.checkpoints(tmp_path / "b")] == [f"checkpoint-{saved_step}"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.setattr(train_module.Collator, "__call__", real_call)

    resumed = train(parse_args(["--output", str(tmp_path / "b"), *common, "--resume"]))
    assert [s["step"] for s in resumed.log["steps"]] == [1, 2, 3, 4, 5, 6]
    assert [s["loss"] for s in resumed.log["steps"]] == pytest.approx([s["loss"] for s in full.log["steps"]],
                                                                      rel=1e-6)
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.fixture(autouse=True)
def default_sigint():
    """Python's own SIGINT handler for each test here, whatever the process started with (a shell's background
    job starts with SIGINT ignored, and then Python installs none), the previous one restored after."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_interrupts_at_once_and_step_zero_saves_nothing(tmp_path):
    import signal

    from fastpeft.train import TrainingInterrupted, _StopOnSignal

    with _StopOnSignal() as stopper:
        os.kill(os.getpid(), signal.SIGINT)  # real signals: the handler runs in this (main) thread
        assert stopper.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises at the next bytecode: never reached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # a signal the process ignores (nohup, a background job's SIGINT) stays ignored
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _StopOnSignal() as stopper:
            os.kill(os.getpid(), signal.SIGINT)
            assert stopper.signum == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    exc = TrainingInterrupted(signal.SIGINT, 0, None)
    assert "stopped by SIGINT before step 1" in str(exc) and isinstance(exc, KeyboardInterrupt)


def test_a_signal_overwrites_an_earlier_runs_checkpoint_at_that_step(tmp_path, monkeypatch):
    """Resumed from checkpoint-2 with another --lr while the first run's checkpoint-4 is still there: a stop
    after step 4 saves this run's step 4 (as a --save-steps checkpoint would), not the first run's."""
    import signal

    import fastpeft.train as train_module

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"upper: w{i} =", "response": f" W{i}"}) + "\n"
                            for i in range(24)))
    out = tmp_path / "run"
    common = ["--data", str(data), "--eval-split", "0", "--max-steps", "6", "--batch-size", "4", "--no-progress",
              "--output", str(out)]
    train(parse_args([*common, "--save-steps", "2"]))
    assert [s for s, _ in train_module.checkpoints(out)] == [2, 4]
    calls = {"n": 0}
    real_call = train_module.Collator.__call__

    def counting_call(self, batch):  # the 2nd micro-batch after resuming at step 2 is step 4's
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, batch)

    monkeypatch.setattr(train_module.Collator, "__call__", counting_call)
    with pytest.raises(train_module.TrainingInterrupted) as stopped:
        train(parse_args([*common, "--save-steps", "100", "--lr", "1e-2", "--resume", str(out / "checkpoint-2")]))
    assert stopped.value.step == 4 and stopped.value.checkpoint == out / "checkpoint-4"
    saved = json.loads((out / "checkpoint-4" / "train_log.json").read_text())
    warmup = int(0.03 * 6)
    assert saved["steps"][3]["lr"] == pytest.approx(1e-2 * train_module.cosine_lr(3, 6, warmup))
    assert saved["args"]["lr"] == 1e-2


def test_use_dora_trains_an_adapter_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    result = train(_args(tmp_path, "--max-steps", "3", "--eval-generate", "0", "--use-dora", "--lr", "1e-2"))
    out = result.output
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    model = result.model.eval()
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all(p.requires_grad for p in magnitudes)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out).eval()
    ids = torch.tensor([TOK.encode("upper: abc =", add_special_tokens=True)])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit, match="--use-dora applies to --method lora and qlora"):
        train(_args(tmp_path / "ia3", "--method", "ia3", "--use-dora", "--max-steps", "1"))


def test_a_signal_before_the_first_step_saves_nothing(tmp_path, monkeypatch):
    import signal

    import fastpeft.train as train_module

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f" r{i}"}) + "\n" for i in range(16)))
    real_call = train_module.Collator.__call__

    def signalled_call(self, batch):  # the first micro-batch of step 1 (grad-accum 2)
        os.kill(os.getpid(), signal.SIGINT)
        return real_call(self, batch)

    monkeypatch.setattr(train_module.Collator, "__call__", signalled_call)
    out = tmp_path / "run"
    with pytest.raises(train_module.TrainingInterrupted, match="before step 1") as stopped:
        train(parse_args(["--data", str(data), "--eval-split", "0", "--max-steps", "3", "--grad-accum", "2",
                          "--batch-size", "4", "--no-progress", "--output", str(out)]))
    assert (stopped.value.step, stopped.value.checkpoint) == (0, None)
    assert train_module.checkpoints(out) == [] and not (out / "adapter_model.safetensors").exists()


def test_trainable_tokens_needs_its_rows(tmp_path):
    with pytest.raises(SystemExit, match="token_indices"):
        train(_args(tmp_path, "--method", "trainable_tokens", "--max-steps", "2"))


# ----------------------------------------------------------------------------- aLoRA through the command
def test_alora_adapter_trains_only_after_its_invocation(tmp_path):
    """``--method-options '{"alora_invocation_tokens": [...]}'`` (" =", bytes 32 61, ends every default prompt):
    the adapter trains, is saved as peft's aLoRA adapter, and leaves the tokens before " =" to the base model."""
    from fastpeft.alora import find_invocation

    invocation = [32, 61]
    result = train(_args(tmp_path, "--max-steps", "6", "--eval-steps", "6", "--eval-generate", "0", "--lr", "1e-2",
                         "--method-options", json.dumps({"alora_invocation_tokens": invocation})))
    first, last = result.log["evals"][0]["eval_loss"], result.log["evals"][-1]["eval_loss"]
    assert last < first
    saved = json.loads((result.output / "adapter_config.json").read_text())
    assert saved["alora_invocation_tokens"] == invocation
    assert saved["modules_to_save"] is None  # "auto" copies no embeddings/head for aLoRA: they act on every token
    import fastpeft
    from fastpeft.generate import load

    model, _ = load(str(result.output))
    ids = torch.tensor([TOK.encode("upper: word = WORD", add_special_tokens=True)])
    [offset] = find_invocation(ids, invocation)
    start = ids.shape[1] - offset
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.allclose(adapted[0, :start], base[0, :start], atol=1e-6)  # before the invocation: the base
    assert not torch.allclose(adapted[0, start:], base[0, start:], atol=1e-4)  # from it on: the adapter
    assert isinstance(model, fastpeft.PeftModel)


def test_generate_stops_at_every_end_of_text_id_the_model_lists():
    """Without --chat too: an instruct model's generation_config lists several end-of-text ids (transformers
    stops at any); the explicit list fastpeft passes must hold them all."""
    from types import SimpleNamespace

    from fastpeft.generate import stop_ids

    tok = SimpleNamespace(eos_token_id=1)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[1, 111]))
    assert stop_ids(tok, model) == [1, 111]
    assert stop_ids(tok, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=7))) == [1, 7]
    assert stop_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace()) == [None]


def test_generate_merge_of_an_unmergeable_adapter_is_a_one_line_error(monkeypatch):
    import fastpeft.generate as gen

    class Prompted:
        def merge_and_unload(self):
            raise NotImplementedError("prompt-learning adapters cannot be merged into the base weights")

    monkeypatch.setattr(gen, "load", lambda *a, **k: (Prompted(), None))
    with pytest.raises(SystemExit, match="^fastpeft generate: --merge: prompt-learning") as exc:
        cli.main(["generate", "--adapter", "x", "--prompt", "p", "--merge"])
    assert "\n" not in str(exc.value.code)
