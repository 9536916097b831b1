"""End-to-end training benchmark: one optimizer step of a Llama-shaped model, fastpeft against peft.

``fastpeft bench --preset e2e`` (CUDA: TinyLlama-1.1B shapes — 2048 hidden, 5632 MLP, 22 layers, GQA 32/4 —
batch 8 × 1024 tokens, the cell of ../shared/TARGETS.md §5) or ``--preset e2e-tiny`` (CPU-sized). LoRA r=16 on
q/k/v/o/gate/up/down with dropout 0.1, AdamW, no checkpointing; bf16 base and NF4 base. Rows: tokens/s and
peak memory for

- ``frozen`` / ``nf4_frozen``: every weight frozen, inputs require grad (the floor: forward + dgrad only);
- ``peft`` / ``peft_qlora``: peft LoRA on the bf16 base / on bitsandbytes ``Linear4bit``;
- ``fastpeft`` / ``fastpeft_qlora``: fastpeft's fused layers on the same bases.

All rows of one run share the process and the device, so their ratios are the result.
"""

from __future__ import annotations

import copy
import gc
import platform
import time
from dataclasses import dataclass

import torch

E2E_PRESETS = {
    "e2e": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, batch=8, seq=1024, steps=6),
    "e2e-tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, batch=4, seq=64, steps=3),
}
E2E_PROVIDERS = ("frozen", "peft", "fastpeft", "nf4_frozen", "peft_qlora", "fastpeft_qlora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class E2ERow:
    """One measured configuration."""

    provider: str
    preset: str
    device: str
    tokens_per_s: float | None
    step_ms: float | None
    peak_mem_gib: float | None
    loss: float | None
    first_loss: float | None = None
    error: str | None = None


def _base_model(shape: dict, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("batch", "seq", "steps")},
                      max_position_embeddings=max(2048, shape["seq"]), attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def _prepare(provider: str, base, dtype: torch.dtype, r: int, p: float):
    model = copy.deepcopy(base)
    if provider in ("nf4_frozen", "peft_qlora", "fastpeft_qlora"):
        from .quant import quantize_model

        model = quantize_model(model, quant_type="nf4", compute_dtype=dtype, backend="bitsandbytes")
    if provider in ("frozen", "nf4_frozen"):
        for param in model.parameters():
            param.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if provider.startswith("peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p,
                                                           target_modules=TARGETS))
    else:
        import fastpeft

        model = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p,
                                                                   target_modules=TARGETS))
    return model


def _measure(model, shape: dict, device: torch.device) -> tuple[float, float, float | None, float]:
    batch, seq, steps = shape["batch"], shape["seq"], shape["steps"]
    gen = torch.Generator().manual_seed(1234)  # the same tokens for every provider
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen).to(device)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda") if params else None
    model.train()

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    first = float(step())
    from .benchmarking import compile_only

    if compile_only():  # one step compiled every kernel this model launches: nothing to time
        return float("nan"), first, None, first
    loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dt, float(loss), peak, first


def run_e2e(preset: str = "e2e-tiny", providers: list[str] | None = None, device: torch.device | None = None,
            r: int = 16, dropout: float = 0.1, dtype: torch.dtype | None = None) -> list[dict]:
    """Measure the providers on the preset's model; rows as dicts (tokens/s, step ms, peak GiB, loss)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = E2E_PRESETS[preset]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    base = _base_model(shape, dtype, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    for provider in providers or E2E_PROVIDERS:
        model = None
        try:
            model = _prepare(provider, base, dtype, r, dropout)
            dt, loss, peak, first = _measure(model, shape, device)
            rows.append(E2ERow(provider, preset, name, round(shape["batch"] * shape["seq"] / dt, 1),
                               round(dt * 1e3, 3), None if peak is None else round(peak, 3), round(loss, 4),
                               round(first, 5)))
        except Exception as exc:  # a provider that cannot run here (e.g. bnb without CUDA) is recorded, not fatal
            rows.append(E2ERow(provider, preset, name, None, None, None, None, None, f"{type(exc).__name__}: {exc}"))
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from .benchmarking import environment

    env = environment(device, dtype)
    env.pop("device", None)
    out = [row.__dict__ | {"dtype": str(dtype).removeprefix("torch."), "r": r, "dropout": dropout,
                           "batch": shape["batch"], "seq": shape["seq"], "steps_timed": shape["steps"], **env}
           for row in rows]
    by = {row["provider"]: row for row in out}
    for ours, theirs in (("fastpeft", "peft"), ("fastpeft_qlora", "peft_qlora")):
        a, b = by.get(ours, {}), by.get(theirs, {})
        if a.get("tokens_per_s") and b.get("tokens_per_s"):
            a["speedup_vs_" + theirs] = round(a["tokens_per_s"] / b["tokens_per_s"], 3)
            if a.get("peak_mem_gib") and b.get("peak_mem_gib"):
                a["mem_ratio_vs_" + theirs] = round(a["peak_mem_gib"] / b["peak_mem_gib"], 3)
    return out


def format_e2e(rows: list[dict]) -> str:
    """A text table of ``run_e2e`` rows."""
    lines = [f"{'provider':16} {'p':>5} {'tokens/s':>10} {'step ms':>9} {'peak GiB':>9} {'loss':>8}  vs peft"]
    for row in rows:
        p = "—" if "frozen" in row["provider"] else f"{row.get('dropout', 0.0):g}"  # a floor has no dropout
        if row.get("error"):
            lines.append(f"{row['provider']:16} {p:>5} error: {row['error'][:90]}")
            continue
        ratio = next((f"{v:.2f}x" for k, v in row.items() if k.startswith("speedup_vs_")), "")
        peak = "-" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.3f}"
        lines.append(f"{row['provider']:16} {p:>5} {row['tokens_per_s']:10.1f} {row['step_ms']:9.2f} {peak:>9} "
                     f"{row['loss']:8.4f}  {ratio}")
    return "\n".join(lines)
