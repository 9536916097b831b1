"""TARGETS.md's performance targets, checked against benchmark rows (``fastpeft bench`` output).

Each target is a ratio of two rows measured in the same run (never against the figures printed in
TARGETS.md). ``evaluate(rows)`` returns one verdict per target whose rows are present; ``fastpeft
targets FILE...`` prints them for saved result files, and every ``fastpeft bench`` prints those its
own rows reach. Example::

    fastpeft targets bench/results/nvidia-h200-*.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

LAYER_SHAPES_MLP = ("4096x14336", "14336x4096")


@dataclass(frozen=True)
class Verdict:
    """One target: what was compared, the measured ratio, the bound, and whether it holds."""

    section: str
    target: str
    value: float
    bound: float
    higher_is_better: bool

    @property
    def ok(self) -> bool:
        """Whether the measured value meets the bound."""
        return self.value >= self.bound if self.higher_is_better else self.value <= self.bound

    def line(self) -> str:
        """One report line: PASS/MISS, the target, the measured value and its bound."""
        sign = "≥" if self.higher_is_better else "≤"
        verdict = "PASS" if self.ok else "MISS"
        return f"[{verdict}] §{self.section} {self.target}: {self.value:.3f} ({sign} {self.bound:g})"


def _find(rows: list[dict], **where) -> dict | None:
    """The first row whose fields equal ``where`` (a callable value is a predicate) and that has a time."""
    for row in rows:
        if row.get("error") or row.get("missing"):
            continue
        if all(v(row.get(k)) if callable(v) else row.get(k) == v for k, v in where.items()):
            return row
    return None


def _ratio(rows, num: dict, den: dict, field: str = "ms") -> float | None:
    a, b = _find(rows, **num), _find(rows, **den)
    if a is None or b is None or not a.get(field) or not b.get(field):
        return None
    return a[field] / b[field]


def _layer(rows: list[dict]) -> Iterable[Verdict]:
    layer = [r for r in rows if "bench" not in r and "preset" not in r and r.get("dtype") == "bf16"]
    for shape, n in (("4096x4096", 8192), ("4096x4096", 2048), *((s, 8192) for s in LAYER_SHAPES_MLP)):
        cell = dict(shape=shape, tokens=n)
        ours = dict(cell, provider="fastpeft", mode="fwdbwd", dropout=0.1)
        bound = 1.35 if n == 2048 else (1.20 if shape == "4096x4096" else 1.10)
        v = _ratio(layer, ours, dict(cell, provider="frozen", mode="fwdbwd"))
        if v is not None:
            yield Verdict("1", f"fastpeft fwd+bwd / frozen, {shape} N={n}, p=0.1", v, bound, False)
        if n == 8192:
            v = _ratio(layer, dict(cell, provider="peft", mode="fwdbwd", dropout=0.1), ours)
            if v is not None:
                yield Verdict("1", f"speed-up over peft default, {shape} N={n}, p=0.1", v,
                              2.5 if shape == "4096x4096" else 1.6, True)
            v = _ratio(layer, dict(cell, provider="peft_bf16", mode="fwdbwd", dropout=0.0), ours)
            if v is not None:
                yield Verdict("1", f"speed-up over peft bf16 adapters p=0 (ours p=0.1), {shape} N={n}", v, 1.0,
                              True)
            v = _ratio(layer, dict(cell, provider="fastpeft", mode="fwd"), dict(cell, provider="frozen", mode="fwd"))
            if v is not None:
                yield Verdict("1", f"fastpeft fwd / frozen fwd, {shape} N={n}", v,
                              1.15 if shape == "4096x4096" else 1.10, False)
            v = _ratio(layer, dict(cell, provider="fastpeft", mode="fwd"), dict(cell, provider="cublas", mode="fwd"))
            if v is not None:
                yield Verdict("1", f"(info) fastpeft fwd / cuBLAS mm, {shape} N={n}", v, float("inf"), False)
        for key, bound, what in (("saved_bytes", 0.45, "one layer"), ("saved_bytes_qkv", 0.20, "q/k/v on one input")):
            v = _ratio(layer, ours, dict(cell, provider="peft", mode="fwdbwd", dropout=0.1), field=key)
            if v is not None:
                yield Verdict("1", f"bytes saved / peft's, {what}, {shape} N={n}", v, bound, False)


def _qlora(rows: list[dict]) -> Iterable[Verdict]:
    q = [r for r in rows if r.get("bench") == "qlora"]
    for shape, bound, speed in (("4096x4096", 1.30, 2.5), ("4096x14336", 1.20, 1.8)):
        ours = dict(shape=shape, provider="fastpeft_4bit", mode="fwdbwd", dropout=0.1)
        v = _ratio(q, ours, dict(shape=shape, provider="frozen", mode="fwdbwd"))
        if v is not None:
            yield Verdict("2", f"QLoRA fwd+bwd / bf16 frozen, {shape}", v, bound, False)
        v = _ratio(q, dict(shape=shape, provider="peft_bnb", mode="fwdbwd", dropout=0.1), ours)
        if v is not None:
            yield Verdict("2", f"QLoRA speed-up over peft + bnb, {shape}", v, speed, True)


def _decode(rows: list[dict]) -> Iterable[Verdict]:
    d = [r for r in rows if r.get("bench") == "decode"]
    for shape, bound in (("4096x14336", 2.5), ("4096x4096", 1.5)):
        for n in sorted({r["tokens"] for r in d if r.get("shape") == shape}):
            v = _ratio(d, dict(shape=shape, tokens=n, provider="frozen"),
                       dict(shape=shape, tokens=n, provider="fastpeft_gemv_lora"))
            if v is not None:
                yield Verdict("3", f"NF4 GEMV + LoRA speed-up over bf16, {shape} N={n}", v, bound, True)


def _mixed(rows: list[dict]) -> Iterable[Verdict]:
    m = [r for r in rows if r.get("bench") == "mixed"]
    for shape in sorted({r["shape"] for r in m}):
        for mode in ("fwd", "fwdbwd"):
            cell = dict(shape=shape, adapters=16, mode=mode)
            v = _ratio(m, dict(cell, provider="fastpeft_mixed"), dict(cell, provider="fastpeft_single"))
            if v is not None:
                yield Verdict("4", f"16-adapter mixed / single adapter, {shape} {mode}", v, 1.3, False)
            v = _ratio(m, dict(cell, provider="peft_mixed"), dict(cell, provider="fastpeft_mixed"))
            if v is not None:
                yield Verdict("4", f"speed-up over peft adapter_names (16 adapters), {shape} {mode}", v, 8.0, True)


def _e2e(rows: list[dict]) -> Iterable[Verdict]:
    e = [r for r in rows if r.get("preset") == "e2e"]  # TARGETS.md §5's model, not the CPU-sized e2e-tiny
    for p in sorted({r.get("dropout") for r in e if r.get("provider") in ("fastpeft", "fastpeft_qlora")}):
        for ours, floor, theirs, name in (("fastpeft", "frozen", "peft", "LoRA"),
                                          ("fastpeft_qlora", "nf4_frozen", "peft_qlora", "QLoRA")):
            mine, peers = dict(provider=ours, dropout=p), dict(provider=theirs, dropout=p)
            v = _ratio(e, mine, dict(provider=floor), field="tokens_per_s")  # a floor has no dropout
            if v is not None:
                yield Verdict("5", f"{name} tokens/s / its frozen floor, p={p}", v, 0.85, True)
            v = _ratio(e, mine, peers, field="tokens_per_s")
            if v is not None:
                yield Verdict("5", f"{name} tokens/s / peft's, p={p}", v, 1.8, True)
            v = _ratio(e, mine, peers, field="peak_mem_gib")
            if v is not None:
                yield Verdict("5", f"{name} peak memory / peft's, p={p}", v, 0.65, False)


SECTIONS: tuple[Callable[[list[dict]], Iterable[Verdict]], ...] = (_layer, _qlora, _decode, _mixed, _e2e)


def evaluate(rows: list[dict]) -> list[Verdict]:
    """Every TARGETS.md target that ``rows`` (from one run) let us compute."""
    return [v for section in SECTIONS for v in section(rows)]


def format_verdicts(verdicts: list[Verdict]) -> str:
    """One line per target; ``(info)`` lines carry a figure with no bound."""
    lines = []
    for v in verdicts:
        lines.append(v.line().replace("[PASS] ", "[info] ").replace(" (≤ inf)", "")
                     if v.target.startswith("(info)") else v.line())
    return "\n".join(lines)


class NotABenchResult(ValueError):
    """A readable JSON file that is not a ``fastpeft bench`` result (e.g. pytest-benchmark's): skipped."""


def rows_of(path: str | Path) -> list[dict]:
    """The rows of a ``fastpeft bench`` JSON file.

    Raises ``OSError`` (missing or unreadable file), ``json.JSONDecodeError``/``UnicodeDecodeError`` (not
    JSON), or :class:`NotABenchResult` (JSON without a list of row objects)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise NotABenchResult(f"{path} is not a fastpeft bench result (no 'rows' list of objects)")
    return rows


def main(paths: list[str]) -> int:
    """``fastpeft targets FILE...``: the verdicts of each file (each file is one run).

    Exit status 1 when a target is missed, 2 when a file is missing or not JSON; a JSON file that is not a
    bench result (pytest-benchmark's beside ours) is skipped."""
    status = 0
    for path in paths:
        print(f"{path}:")
        try:
            verdicts = evaluate(rows_of(path))
        except NotABenchResult as exc:  # e.g. pytest-benchmark's JSON beside ours
            print(f"  skipped: {exc}")
            continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            print(f"fastpeft targets: cannot read {path}: {reason}", file=sys.stderr)
            status = 2
            continue
        print(format_verdicts(verdicts) if verdicts else "  (no TARGETS.md cell in this file)")
        if status != 2 and any(not v.ok for v in verdicts if not v.target.startswith("(info)")):
            status = 1
    return status


__all__ = ["NotABenchResult", "Verdict", "evaluate", "format_verdicts", "main", "rows_of"]
