"""The benchmark harness (fastpeft.benchmarking) and ``fastpeft bench``, on CPU with the torch backend."""

import json
import math

import pytest
import torch
from torch import nn

from fastpeft import benchmarking
from fastpeft.cli import main

pytest.importorskip("peft")

ROW_KEYS = {"device", "versions", "command", "date", "shape", "tokens", "provider", "mode", "dropout",
            "adapter_dtype", "timer", "ms", "ms_p20", "ms_p80", "times_ms", "peak_bytes", "vs_frozen", "vs_peft"}


@pytest.fixture(scope="module")
def tiny_rows():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTPEFT_BACKEND", "torch")
        return benchmarking.run("tiny", warmup_ms=1, rep_ms=5)


def test_saved_bytes_count_each_storage_once_and_skip_parameters():
    x = torch.randn(10, 8, requires_grad=True)
    w = nn.Parameter(torch.randn(8, 4))
    with benchmarking.SavedTensorCounter(exclude=[w]) as saved:
        y = x * x  # saves x twice
        z = x[2:] @ w  # saves a view of x (same storage) and the parameter
        e = x.exp()  # saves its result: a new storage
    assert saved.nbytes == 2 * x.numel() * 4
    with benchmarking.SavedTensorCounter() as unexcluded:
        z = x @ w
    assert unexcluded.nbytes == (x.numel() + w.numel()) * 4
    del y, z, e


def test_saved_bytes_skip_graphs_freed_before_backward():
    """Only what autograd still holds at the end of the block counts: a graph built and dropped inside it (peft's
    DoRA runs lora_B(lora_A(eye(in))) for its weight norm, then detaches the result) keeps nothing for backward."""
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(64, 64, requires_grad=True)
    with benchmarking.SavedTensorCounter() as saved:
        transient = (w * 3.0).exp()  # saves its (64, 64) result ...
        del transient  # ... freed with its graph before any backward
        y = x.exp()  # saves its result, kept
    assert saved.nbytes == y.numel() * 4
    del y


def test_frozen_linear_saves_nothing_beyond_its_weight():
    lin = nn.Linear(8, 4).requires_grad_(False)
    x = torch.randn(3, 8, requires_grad=True)
    with benchmarking.SavedTensorCounter(exclude=lin.parameters()) as saved:
        y = lin(x)
    assert saved.nbytes == 0
    del y


def test_tiny_preset_rows(tiny_rows):
    seen = {(r["provider"], r["mode"]) for r in tiny_rows}
    assert seen == {(p, m) for p in benchmarking.PROVIDERS for m in benchmarking.MODES}
    for r in tiny_rows:
        assert ROW_KEYS <= r.keys(), ROW_KEYS - r.keys()
        assert r["timer"] == "wall" and len(r["times_ms"]) >= 5
        assert all(math.isfinite(t) and t > 0 for t in (r["ms"], r["ms_p20"], r["ms_p80"]))
        assert r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["versions"]["torch"] == torch.__version__
    frozen = [r for r in tiny_rows if r["provider"] == "frozen"]
    assert all(r["vs_frozen"] == 1.0 for r in frozen)
    assert all(r["saved_bytes"] == 0 for r in frozen if r["mode"] == "fwdbwd")
    lora_fwdbwd = [r for r in tiny_rows if r["mode"] == "fwdbwd" and r["provider"] not in ("frozen", "cublas")]
    assert {r["dropout"] for r in lora_fwdbwd} == {0.1, 0.0}
    for r in lora_fwdbwd:
        assert r["grads_ok"] is True
        assert r["saved_bytes"] > 0 and r["saved_bytes_qkv"] >= r["saved_bytes"]
        if r["provider"].startswith("fastpeft"):
            assert r["check_ok"] is True, r["check_errors"]
            assert set(r["check_errors"]) == {"y", "dx", "dA", "dB"}


def test_gradient_check_flags_wrong_results():
    g = torch.Generator().manual_seed(0)
    ref = {k: torch.randn(16, 8, generator=g, dtype=torch.bfloat16) for k in ("y", "dx", "dA", "dB")}
    tol = benchmarking.CHECK_TOL[torch.bfloat16]
    assert benchmarking.compare_grads(dict(ref), ref, tol)["check_ok"] is True
    wrong = {**ref, "dA": ref["dA"] * 1.1}  # a 10% error in one gradient
    result = benchmarking.compare_grads(wrong, ref, tol)
    assert result["check_ok"] is False and result["check_errors"]["dA"] > tol >= result["check_errors"]["dx"]
    nan = {**ref, "dB": ref["dB"].clone().index_fill_(0, torch.tensor([3]), float("nan"))}
    assert benchmarking.compare_grads(nan, ref, tol)["check_errors"]["dB"] == math.inf
    zero = {k: torch.zeros_like(v) for k, v in ref.items()}
    assert benchmarking.compare_grads(zero, zero, tol)["check_ok"] is False  # vacuous: nothing was computed
    assert benchmarking.row_ok({"check_ok": True, "grads_ok": False}) is False


def test_format_table(tiny_rows):
    table = benchmarking.format_table(tiny_rows)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["shape", "N", "mode", "p", "provider"]
    assert len(lines) == len(tiny_rows) + 4  # header, rows, blank, device line, versions
    assert "FAIL" not in table and "fastpeft_bf16" in table and "torch " + torch.__version__ in table


def test_parse_shape():
    assert benchmarking.parse_shape("4096x14336") == (4096, 14336)
    assert benchmarking.parse_shape("45X7") == (45, 7)
    with pytest.raises(ValueError, match="neither"):
        benchmarking.parse_shape("big")


def test_cli_bench_writes_json_and_plot(tmp_path, torch_backend, capsys):
    out, png = tmp_path / "res" / "tiny.json", tmp_path / "tiny.png"
    rc = main(["bench", "--preset", "tiny", "--rep-ms", "5", "--providers", "frozen", "cublas", "peft", "fastpeft",
               "--out", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())  # strict JSON
    assert data["schema"] == 1 and {r["provider"] for r in data["rows"]} == {"frozen", "cublas", "peft", "fastpeft"}
    assert benchmarking.load_json(out) == data["rows"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fastpeft" in capsys.readouterr().out


# ----------------------------------------------------------------------- 4-bit presets
@pytest.fixture(scope="module")
def qlora_tiny_rows():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTPEFT_BACKEND", "torch")
        return benchmarking.run_quant("qlora-tiny", device="cpu", warmup_ms=1, rep_ms=2)


@pytest.mark.interp  # the GEMV providers launch the Triton kernel on CPU tensors
def test_decode_tiny_rows():
    rows = benchmarking.run_quant("decode-tiny", device="cpu", warmup_ms=1, rep_ms=2)
    assert {(r["shape"], r["tokens"]) for r in rows} == {("64x96", 1), ("64x96", 3)}
    by = {(r["provider"], r["tokens"]): r for r in rows}
    assert {p for p, _ in by} == set(benchmarking.DECODE_PROVIDERS)
    for n in (1, 3):
        assert by[("frozen", n)]["vs_frozen"] == 1.0 and by[("frozen", n)]["timer"] == "wall"
        for p in ("fastpeft_gemv", "fastpeft_gemv_lora"):
            r = by[(p, n)]
            assert r["check_ok"] is True, r.get("check_errors")
            assert r["kernels_per_step"] == {"lora_gemv_4bit": 1}
            assert r["weight_bytes"] < by[("frozen", n)]["weight_bytes"] / 2  # tables weigh at this size
        assert "ms" in by[("bnb_linear4bit", n)]
    assert "ms" in by[("bnb_gemv_4bit", 1)] and "one row" in by[("bnb_gemv_4bit", 3)]["error"]
    fast4 = by[("fastpeft_4bit", 1)]
    assert "ms" in fast4 or "missing" in fast4
    assert benchmarking.format_quant_table(rows).count("decode") == len(rows)


def test_qlora_tiny_rows(qlora_tiny_rows):
    by = {r["provider"]: r for r in qlora_tiny_rows}
    assert set(by) == set(benchmarking.QLORA_PROVIDERS)
    for p in ("frozen", "bnb_frozen", "peft_bnb", "fastpeft_bf16"):
        r = by[p]
        assert r["mode"] == "fwdbwd" and r["grads_ok"] is True and r["ms"] > 0
        assert ROW_KEYS <= r.keys(), ROW_KEYS - r.keys()
    assert by["frozen"]["vs_frozen"] == 1.0 and by["peft_bnb"]["vs_peft"] == 1.0
    assert by["peft_bnb"]["dropout"] == 0.1 and by["bnb_frozen"]["dropout"] is None
    assert by["bnb_frozen"]["weight_bytes"] < by["frozen"]["weight_bytes"] / 2
    if "missing" not in by["fastpeft_4bit"]:
        assert by["fastpeft_4bit"]["check_ok"] is True, by["fastpeft_4bit"].get("check_errors")


def test_weight_bytes_nf4_double_quant():
    lin = nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    lin4 = benchmarking._linear4bit(lin, 64)
    n = 256 * 64
    # codes (½ byte), one uint8 absmax per 64, one fp32 per 256 of those, two code tables
    assert benchmarking.weight_bytes(lin4) == n // 2 + n // 64 + 4 * -(-n // 64 // 256) + 16 * 4 + 256 * 4
    assert benchmarking.weight_bytes(lin.weight) == 2 * n


def test_cli_qlora_tiny_writes_json(tmp_path, torch_backend, capsys):
    out = tmp_path / "q.json"
    rc = main(["bench", "--preset", "qlora-tiny", "--rep-ms", "2", "--warmup-ms", "1", "--device", "cpu",
               "--providers", "frozen", "fastpeft_bf16", "--out", str(out)])
    assert rc == 0
    rows = benchmarking.load_json(out)
    assert {r["provider"] for r in rows} == {"frozen", "fastpeft_bf16"} and rows[0]["bench"] == "qlora"
    assert "qlora" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--tokens", "0"], "--tokens must be ≥ 1, got 0"),
    (["--r", "0"], "--r must be ≥ 1"),
    (["--shapes", "foo"], "--shapes: shape 'foo' is neither"),
    (["--shapes", "0x64"], "--shapes sizes must be ≥ 1"),
    (["--dropout", "1.5"], r"--dropout must be in \[0, 1\]"),
    (["--adapters", "0"], "--adapters must be ≥ 1"),
    (["--rep-ms", "0"], "--rep-ms must be > 0"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device"),
])
def test_bench_refuses_bad_sizes_before_running(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=f"fastpeft bench: {match}"):
        main(["bench", "--out", str(tmp_path / "r.json"), *argv])
    assert not (tmp_path / "r.json").exists()
