"""Multi-process training with PyTorch's own engines: DDP, FSDP2 (``fully_shard``), accelerate; 2 processes.

``tests/dist_scripts/lora_worker.py`` runs under ``torchrun --nproc_per_node 2`` (gloo on CPU, NCCL
where each rank has a GPU): a tiny Llama with fastpeft LoRA on every linear layer, each rank on its half
of a fixed batch, two SGD steps. The same script runs here in-process on the whole batch; per-step
losses, the full LoRA gradients and the final weights must agree (fp32 tolerance of DESIGN.md), and
the adapter saved from the sharded model must be the same file as the one saved by one process.

Dropout is off in these runs: a rank's half-batch mask cannot equal the rows of a whole-batch mask
(the mask is a function of the seed and the row index), so p > 0 could never match the single run.
Every launch is bounded by a hard timeout so that a hang fails instead of blocking CI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_rel, assert_rule

pytest.importorskip("transformers")
if not torch.distributed.is_available():  # pragma: no cover - torch builds without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

SCRIPT = Path(__file__).parent / "dist_scripts" / "lora_worker.py"
TIMEOUT_S = 150
NPROC = 2


def _worker_module():
    spec = importlib.util.spec_from_file_location("fastpeft_test_lora_worker", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _has_4bit() -> bool:
    try:
        import bitsandbytes  # noqa: F401

        import fastpeft.layers.lora4bit  # noqa: F401
    except Exception:  # ImportError, or bitsandbytes failing to load its native library
        return False
    return True


def run_launcher(cmd: list[str], timeout: float = TIMEOUT_S, env: dict | None = None) -> str:
    """Run a multi-process launcher command; its whole process group is killed on timeout. Returns the output."""
    env = {**{k: v for k, v in os.environ.items() if k != "FASTPEFT_BACKEND"}, "OMP_NUM_THREADS": "1",
           **(env or {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: a hang must not outlive the test
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[:4]} did not finish within {timeout} s (hang?):\n{out[-4000:]}")
    assert proc.returncode == 0, f"{cmd[:4]} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def run_torchrun(args: list[str], nproc: int = NPROC) -> str:
    """``python -m torch.distributed.run --standalone --nproc_per_node nproc SCRIPT args``."""
    return run_launcher([sys.executable, "-m", "torch.distributed.run", "--standalone",
                         f"--nproc_per_node={nproc}", str(SCRIPT), *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Records of the 2-process DDP / FSDP2 runs and of the single-process whole-batch runs."""
    out = tmp_path_factory.mktemp("dist")
    modes = ["ddp", "fsdp", "fsdp_bf16"] + (["fsdp4bit"] if _has_4bit() else [])
    run_torchrun(["--modes", ",".join(modes), "--out", str(out / "multi"), "--save"])
    single = ["single", "single_bf16"] + (["single4bit"] if "fsdp4bit" in modes else [])
    _worker_module().main(["--modes", ",".join(single), "--out", str(out / "one"), "--save"])
    return out


def _load(runs: Path, which: str, mode: str) -> dict:
    return torch.load(runs / which / mode / "record.pt", weights_only=True)


def _assert_same_training(multi: dict, one: dict) -> None:
    assert len(multi["loss"]) == len(one["loss"]) >= 2
    for step, (lm, lo) in enumerate(zip(multi["loss"], one["loss"])):
        assert abs(lm - lo) <= 1e-5 * abs(lo), f"step {step}: loss {lm} vs {lo}"
        gm, go = multi["grads"][step], one["grads"][step]
        assert set(gm) == set(go) and len(go) > 0
        for name, g in go.items():
            assert g.norm() > 0, f"{name}: zero gradient (the comparison would be vacuous)"
            assert_rel(gm[name], g, 1e-5, f"step {step} grad {name}")
    for name, w in one["weights"].items():
        assert_rel(multi["weights"][name], w, 1e-5, f"final {name}")


def test_ddp_two_processes_match_one_process(runs):
    """DDP (gloo on CPU): averaged LoRA gradients of two half batches = one process on the whole batch.

    Two optimizer steps run without ``find_unused_parameters``: DDP raises on the second step when a
    trainable parameter got no gradient, so passing also proves no parameter is "unused".
    """
    multi, one = _load(runs, "multi", "ddp"), _load(runs, "one", "single")
    assert (multi["world"], multi["wrapper"], one["world"]) == (NPROC, "DistributedDataParallel", 1)
    assert set(multi["grads"][0]) == set(one["grads"][0])
    assert all(name.split(".")[-3] in ("lora_A", "lora_B") for name in one["grads"][0])
    _assert_same_training(multi, one)


def test_fsdp2_two_processes_match_one_process(runs):
    """FSDP2 ``fully_shard`` per decoder layer and at the root: same losses, gradients, weights."""
    multi, one = _load(runs, "multi", "fsdp"), _load(runs, "one", "single")
    assert multi["world"] == NPROC
    assert set(multi["sharded"].values()) == {"DTensor"}, "LoRA parameters were not sharded"
    base = [n for n in multi["base_sharded"] if ".base_layer." in n]
    assert len(base) == 14, f"frozen base weights of the LoRA layers were not all sharded: {base}"
    _assert_same_training(multi, one)


def test_fsdp2_bf16_mixed_precision(runs):
    """FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: first-step loss and LoRA
    grads by the tolerance rule — against the fp32 single run, no worse than one process computing in bf16."""
    multi, ref = _load(runs, "multi", "fsdp_bf16"), _load(runs, "one", "single")
    lowp = _load(runs, "one", "single_bf16")
    assert set(multi["sharded"].values()) == {"DTensor"}
    assert_rule(torch.tensor(multi["loss"][0]), torch.tensor(ref["loss"][0]), torch.tensor(lowp["loss"][0]),
                name="loss")
    for name, g in ref["grads"][0].items():
        assert multi["grads"][0][name].dtype == torch.float32  # reduce_dtype: fp32 gradients
        assert_rule(multi["grads"][0][name], g, lowp["grads"][0][name], 3.0, name)


def _same_adapter_folder(a: Path, b: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between {a} and {b}"


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_adapter_saved_from_multi_process_model_is_the_same_file(runs, mode):
    """``save_pretrained`` called on every rank (is_main_process on rank 0) writes one process's file.

    Before training the bytes are identical; after training the tensors agree within fp32 rounding
    (two half-batch gradients are summed in another order).
    """
    from safetensors.torch import load_file

    _same_adapter_folder(runs / "multi" / mode / "adapter_init", runs / "one" / "single" / "adapter_init")
    trained = load_file(runs / "multi" / mode / "adapter_trained" / "adapter_model.safetensors")
    ref = load_file(runs / "one" / "single" / "adapter_trained" / "adapter_model.safetensors")
    assert set(trained) == set(ref) and len(ref) == 28
    for key, value in ref.items():
        assert_rel(trained[key], value, 1e-5, key)
    init = load_file(runs / "one" / "single" / "adapter_init" / "adapter_model.safetensors")
    assert any(not torch.equal(init[k], ref[k]) for k in ref), "training changed nothing"


def test_fsdp2_4bit_base(runs):
    """FSDP2 over a bitsandbytes NF4 base (fastpeft's 4-bit layer): same as one process.

    The 4-bit weights are passed to ``fully_shard(ignored_params=...)`` and stay replicated: FSDP2 drops
    a ``Params4bit``'s ``quant_state`` when it swaps in the gathered tensor. The LoRA weights are sharded.
    """
    if not (runs / "multi" / "fsdp4bit").exists():
        pytest.skip("fastpeft.layers.lora4bit or bitsandbytes is not available")
    multi = _load(runs, "multi", "fsdp4bit")
    assert set(multi["sharded"].values()) == {"DTensor"}
    _assert_same_training(multi, _load(runs, "one", "single4bit"))
    _same_adapter_folder(runs / "multi" / "fsdp4bit" / "adapter_init", runs / "one" / "single4bit" / "adapter_init")


def test_accelerate_launch_two_processes(runs, tmp_path):
    """``accelerate launch`` with 2 processes: Accelerator.prepare wraps in DDP; same training as one process.

    On a CPU machine accelerate needs ``ACCELERATE_USE_CPU=1`` to give the torchrun-started processes a
    gloo group (``--cpu`` alone starts one process unless MPI is set up).
    """
    pytest.importorskip("accelerate")
    env = {} if torch.cuda.device_count() >= NPROC else {"ACCELERATE_USE_CPU": "1"}
    run_launcher([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(NPROC),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", "0", str(SCRIPT), "--modes", "accelerate", "--out", str(tmp_path),
                  "--save"], env=env)
    multi = torch.load(tmp_path / "accelerate" / "record.pt", weights_only=True)
    assert (multi["world"], multi["wrapper"]) == (NPROC, "DistributedDataParallel")
    _assert_same_training(multi, _load(runs, "one", "single"))
    _same_adapter_folder(tmp_path / "accelerate" / "adapter_init", runs / "one" / "single" / "adapter_init")


def test_accelerate_launch_fastpeft_train(tmp_path):
    """``accelerate launch`` of ``fastpeft train`` with 2 processes on the embedded default, 2 steps.

    Beyond finishing, the run must really be distributed: the log records ``world_size`` 2 and only
    the main process reports (the start banner appears once), and the adapter loads.
    """
    pytest.importorskip("accelerate")
    from fastpeft.cli import build_parser

    try:
        build_parser().parse_args(["train", "--max-steps", "2"])
    except SystemExit:
        pytest.skip("this fastpeft has no `train` command")
    env = {} if torch.cuda.device_count() >= NPROC else {"ACCELERATE_USE_CPU": "1"}
    out = run_launcher([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                        str(NPROC), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_port", "0", "-m", "fastpeft", "train", "--max-steps", "2",
                        "--eval-generate", "0", "--no-progress", "--output", str(tmp_path)], env=env)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    import json

    log = json.loads((tmp_path / "train_log.json").read_text())
    assert len(log["steps"]) == 2
    assert log.get("world_size") == NPROC, "train_log.json does not record a 2-process run"
    banners = [line for line in out.splitlines() if line.startswith("fastpeft train:")]
    assert len(banners) == 1, f"every process reported, not only the main one: {banners}"


@pytest.mark.gpu
def test_ddp_two_ranks_sharing_one_gpu(tmp_path):
    """DDP with the compiled kernels on CUDA tensors, two ranks on one GPU (gloo carries the all-reduce:
    NCCL refuses two ranks on one device): the same training as one CPU process on the whole batch."""
    run_torchrun(["--modes", "ddp", "--out", str(tmp_path / "multi"), "--shared-gpu"])
    _worker_module().main(["--modes", "single", "--out", str(tmp_path / "one")])
    one, multi = _load(tmp_path, "one", "single"), _load(tmp_path, "multi", "ddp")
    assert multi["world"] == NPROC and multi["wrapper"] == "DistributedDataParallel"
    for step, (lm, lo) in enumerate(zip(multi["loss"], one["loss"])):
        assert abs(lm - lo) <= 1e-4 * abs(lo), f"step {step}: loss {lm} vs {lo}"
    for step in range(len(one["grads"])):
        for name, g in one["grads"][step].items():
            assert_rel(multi["grads"][step][name], g, 1e-3, f"step {step} grad {name}")


@pytest.mark.gpu
def test_nccl_ddp_and_fsdp2_on_gpus(tmp_path):
    """The same runs with NCCL, one GPU per rank (the worker picks NCCL when every rank has a GPU)."""
    if torch.cuda.device_count() < NPROC:
        pytest.skip(f"needs {NPROC} GPUs (NCCL cannot run two ranks on one GPU)")
    run_torchrun(["--modes", "ddp,fsdp", "--out", str(tmp_path / "multi"), "--save"])
    _worker_module().main(["--modes", "single", "--out", str(tmp_path / "one"), "--save"])
    one = _load(tmp_path, "one", "single")
    for mode in ("ddp", "fsdp"):
        multi = _load(tmp_path, "multi", mode)
        # CPU reference vs GPU ranks: Triton kernels and cuBLAS sum in other orders (TF32 off by default).
        for step, (lm, lo) in enumerate(zip(multi["loss"], one["loss"])):
            assert abs(lm - lo) <= 1e-4 * abs(lo), f"{mode} step {step}: loss {lm} vs {lo}"
        for name, g in one["grads"][0].items():
            assert_rel(multi["grads"][0][name], g, 1e-3, f"{mode} grad {name}")


STOP_SCRIPT = '''
import json, os, signal, sys
import fastpeft.train as t

rank = int(os.environ["RANK"])
calls = {"n": 0}
real = t.Collator.__call__


def call(self, batch):  # only rank 1 is signalled, during its 3rd micro-batch (step 2 of grad-accum 2)
    calls["n"] += 1
    if rank == 1 and calls["n"] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, batch)


t.Collator.__call__ = call
try:
    t.train(t.parse_args(sys.argv[1:]))
    result = {"finished": True}
except t.TrainingInterrupted as exc:
    result = {"step": exc.step, "signum": exc.signum, "checkpoint": str(exc.checkpoint)}
out = sys.argv[sys.argv.index("--output") + 1]
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
'''


def test_a_signal_to_one_process_stops_all_after_the_same_step(tmp_path):
    """SIGTERM reaching one DDP process only: every process stops after the same optimizer step (the stop flag
    travels with the step's loss all-reduce), rank 0 saves that step's checkpoint, nobody hangs."""
    import json

    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f" r{i}"}) + "\n" for i in range(64)))
    out = tmp_path / "run"
    run_launcher([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
                  str(script), "--data", str(data), "--eval-split", "0", "--max-steps", "8", "--grad-accum", "2",
                  "--batch-size", "2", "--save-steps", "100", "--no-progress", "--output", str(out)])
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(NPROC))
    assert r0["step"] == r1["step"] == 2, (r0, r1)  # rank 1 was signalled mid-step 2: that step completes
    assert r1["signum"] == signal.SIGTERM
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()  # the final adapter is not written for a stopped run


def test_two_process_train_resumed_equals_the_uninterrupted_run(tmp_path):
    """``fastpeft train`` under ``torchrun`` with 2 processes and grad-accum 2, resumed from a step-1 checkpoint,
    logs the losses of the uninterrupted run: the checkpoint records where the step's group of world × grad-accum
    micro-batches ends for every process (the last process's index + 1 would make the others replay a batch)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i} " * (1 + i % 5), "response": "r" * (1 + i % 7)}) + "\n"
                            for i in range(40)))

    def launch(out, *flags):
        run_launcher([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
                      "-m", "fastpeft", "train", "--data", str(data), "--eval-split", "0", "--batch-size", "2",
                      "--grad-accum", "2", "--device", "cpu", "--no-progress", "--eval-generate", "0",
                      "--max-length", "24", "--output", str(out), *flags])
        return [s["loss"] for s in json.loads((out / "train_log.json").read_text())["steps"]]

    full = launch(tmp_path / "full", "--max-steps", "6", "--save-steps", "100")
    launch(tmp_path / "part", "--max-steps", "2", "--save-steps", "1")
    resumed = launch(tmp_path / "part", "--max-steps", "6", "--save-steps", "100", "--resume",
                     str(tmp_path / "part" / "checkpoint-1"))
    assert resumed == full


def test_fsdp2_save_of_the_other_methods(tmp_path):
    """IA3, AdaLoRA, LN tuning and prompt tuning saved from an FSDP2-sharded model (2 processes) write the file one
    process writes (the gather is collective: every rank computes the state, rank 0 writes; peft 0.21 crashes on
    all of them, and so did fastpeft: a sharded storage, or the prompt encoder run on sharded weights)."""
    from safetensors.torch import load_file

    script = Path(__file__).parent / "dist_scripts" / "methods_save_worker.py"
    run_launcher([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
                  str(script), "--out", str(tmp_path / "multi")])
    run_launcher([sys.executable, str(script), "--single", "--out", str(tmp_path / "one")])
    for method in ("ia3", "adalora", "lntuning", "prompt"):
        multi = load_file(tmp_path / "multi" / method / "adapter_model.safetensors")
        one = load_file(tmp_path / "one" / method / "adapter_model.safetensors")
        assert multi.keys() == one.keys() and len(one) > 0, method
        for k in one:
            torch.testing.assert_close(multi[k], one[k], rtol=1e-5, atol=1e-6, msg=f"{method} {k}")
