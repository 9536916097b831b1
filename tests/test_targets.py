"""TARGETS.md verdicts from benchmark rows: the right rows divided, the right bounds, PASS and MISS."""

import json

import pytest

from fastpeft import cli
from fastpeft.targets import evaluate


def _layer_rows(fast_ms=1.10, peft_ms=3.0):
    cell = dict(shape="4096x4096", tokens=8192, dtype="bf16")
    return [
        dict(cell, provider="frozen", mode="fwdbwd", dropout=None, ms=1.0),
        dict(cell, provider="fastpeft", mode="fwdbwd", dropout=0.1, ms=fast_ms, saved_bytes=40, saved_bytes_qkv=40),
        dict(cell, provider="peft", mode="fwdbwd", dropout=0.1, ms=peft_ms, saved_bytes=100, saved_bytes_qkv=300),
        dict(cell, provider="peft_bf16", mode="fwdbwd", dropout=0.0, ms=1.5),
        dict(cell, provider="frozen", mode="fwd", dropout=None, ms=0.4),
        dict(cell, provider="fastpeft", mode="fwd", dropout=None, ms=0.5),  # 1.25 > 1.15: a miss
        dict(cell, provider="cublas", mode="fwd", dropout=None, ms=0.38),
        dict(cell, provider="fastpeft", mode="fwdbwd", dropout=0.0, ms=0.1),  # not the p=0.1 cell: ignored
    ]


def test_layer_verdicts():
    got = {v.target: v for v in evaluate(_layer_rows())}
    v = got["fastpeft fwd+bwd / frozen, 4096x4096 N=8192, p=0.1"]
    assert v.value == pytest.approx(1.10) and v.bound == 1.20 and v.ok
    v = got["speed-up over peft default, 4096x4096 N=8192, p=0.1"]
    assert v.value == pytest.approx(3.0 / 1.1) and v.bound == 2.5 and v.ok
    assert got["speed-up over peft bf16 adapters p=0 (ours p=0.1), 4096x4096 N=8192"].value == pytest.approx(1.5 / 1.1)
    v = got["fastpeft fwd / frozen fwd, 4096x4096 N=8192"]
    assert v.value == pytest.approx(1.25) and not v.ok
    assert got["bytes saved / peft's, one layer, 4096x4096 N=8192"].value == pytest.approx(0.4)
    v = got["bytes saved / peft's, q/k/v on one input, 4096x4096 N=8192"]
    assert v.value == pytest.approx(40 / 300) and v.ok
    # a slow run misses; an errored row counts as absent
    slow = {v.target: v for v in evaluate(_layer_rows(fast_ms=1.5, peft_ms=3.0))}
    assert not slow["fastpeft fwd+bwd / frozen, 4096x4096 N=8192, p=0.1"].ok
    assert not slow["speed-up over peft default, 4096x4096 N=8192, p=0.1"].ok
    rows = _layer_rows()
    rows[1]["error"] = "RuntimeError"
    assert not any("fwd+bwd / frozen" in v.target for v in evaluate(rows))


def test_other_sections():
    rows = [
        dict(bench="qlora", shape="4096x4096", provider="frozen", mode="fwdbwd", dropout=None, ms=1.0),
        dict(bench="qlora", shape="4096x4096", provider="fastpeft_4bit", mode="fwdbwd", dropout=0.1, ms=1.2),
        dict(bench="qlora", shape="4096x4096", provider="peft_bnb", mode="fwdbwd", dropout=0.1, ms=3.3),
        dict(bench="decode", shape="4096x14336", tokens=1, provider="frozen", ms=0.054),
        dict(bench="decode", shape="4096x14336", tokens=1, provider="fastpeft_gemv_lora", ms=0.020),
        dict(bench="mixed", shape="4096x4096", adapters=16, mode="fwd", provider="fastpeft_single", ms=1.0),
        dict(bench="mixed", shape="4096x4096", adapters=16, mode="fwd", provider="fastpeft_mixed", ms=1.2),
        dict(bench="mixed", shape="4096x4096", adapters=16, mode="fwd", provider="peft_mixed", ms=8.4),
        dict(preset="e2e", provider="frozen", dropout=0.05, tokens_per_s=60000.0, peak_mem_gib=15.0),
        dict(preset="e2e", provider="peft", dropout=0.05, tokens_per_s=29000.0, peak_mem_gib=30.0),
        dict(preset="e2e", provider="fastpeft", dropout=0.05, tokens_per_s=52000.0, peak_mem_gib=21.0),
        dict(preset="e2e", provider="peft", dropout=0.1, tokens_per_s=28000.0, peak_mem_gib=31.0),
        dict(preset="e2e", provider="fastpeft", dropout=0.1, tokens_per_s=51000.0, peak_mem_gib=20.0),
        dict(preset="e2e-tiny", provider="fastpeft", dropout=0.2, tokens_per_s=1.0, peak_mem_gib=1.0),
    ]
    got = {v.target: v for v in evaluate(rows)}
    assert got["QLoRA fwd+bwd / bf16 frozen, 4096x4096"].value == pytest.approx(1.2)
    assert got["QLoRA speed-up over peft + bnb, 4096x4096"].value == pytest.approx(2.75)
    v = got["NF4 GEMV + LoRA speed-up over bf16, 4096x14336 N=1"]
    assert v.value == pytest.approx(2.7) and v.ok
    assert got["16-adapter mixed / single adapter, 4096x4096 fwd"].ok
    assert got["speed-up over peft adapter_names (16 adapters), 4096x4096 fwd"].value == pytest.approx(7.0)
    assert not got["speed-up over peft adapter_names (16 adapters), 4096x4096 fwd"].ok
    assert got["LoRA tokens/s / its frozen floor, p=0.05"].value == pytest.approx(52 / 60)
    assert got["LoRA tokens/s / its frozen floor, p=0.1"].value == pytest.approx(51 / 60)  # one floor for both
    v = got["LoRA peak memory / peft's, p=0.05"]
    assert v.value == pytest.approx(0.7) and not v.ok
    assert got["LoRA tokens/s / peft's, p=0.1"].value == pytest.approx(51 / 28)
    assert not any("p=0.2" in k for k in got)  # e2e-tiny rows are not the target's model
    assert not any(v.target.startswith("QLoRA tokens/s") for v in got.values())  # no QLoRA e2e rows


def test_targets_command(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"schema": 1, "rows": _layer_rows()}))
    assert cli.main(["targets", str(path)]) == 1  # the forward target is missed
    out = capsys.readouterr().out
    assert "[PASS] §1 fastpeft fwd+bwd / frozen, 4096x4096 N=8192, p=0.1: 1.100 (≤ 1.2)" in out
    assert "[MISS] §1 fastpeft fwd / frozen fwd, 4096x4096 N=8192: 1.250 (≤ 1.15)" in out
    assert "[info] §1 (info) fastpeft fwd / cuBLAS mm" in out
    empty = tmp_path / "tiny.json"
    empty.write_text(json.dumps({"rows": [dict(shape="64x96", tokens=48, provider="frozen", ms=1.0)]}))
    assert cli.main(["targets", str(empty)]) == 0
    assert "no TARGETS.md cell" in capsys.readouterr().out
    other = tmp_path / "pytest-benchmark.json"
    other.write_text(json.dumps({"benchmarks": []}))
    assert cli.main(["targets", str(other), str(empty)]) == 0
    assert "skipped:" in capsys.readouterr().out


def test_targets_command_fails_on_a_missing_or_unreadable_file(tmp_path, capsys):
    good = tmp_path / "tiny.json"
    good.write_text(json.dumps({"rows": [dict(shape="64x96", tokens=48, provider="frozen", ms=1.0)]}))
    assert cli.main(["targets", str(tmp_path / "nonexist.json"), str(good)]) == 2
    err = capsys.readouterr().err
    assert "fastpeft targets: cannot read" in err and "nonexist.json" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert cli.main(["targets", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err
    notrows = tmp_path / "rows.json"
    notrows.write_text(json.dumps({"rows": [1, 2]}))
    assert cli.main(["targets", str(notrows)]) == 0  # a JSON file that is not a bench result: skipped
    assert "skipped:" in capsys.readouterr().out
