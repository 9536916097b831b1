"""The ``fastpeft`` command line: ``fastpeft <command> ...`` (also ``python -m fastpeft``).

Each command is one ``_add_<command>`` that builds its subparser and sets
``func``; ``main`` dispatches: ``train``, ``generate``, ``estimate``, ``bench``, ``targets``.

Example::

    fastpeft train                       # the embedded default: tiny Llama-style model, shipped task
    fastpeft generate --adapter runs/fastpeft --prompt "upper: hello ="
    fastpeft estimate --model ./llama --method qlora --batch-size 8 --seq-len 1024
    fastpeft bench                       # tiny preset on CPU, TARGETS.md's canonical cells on CUDA
    fastpeft bench --preset layer --shapes 4096x4096 --tokens 8192 --plot bench/results/h100.png
    fastpeft targets bench/results/*.json  # TARGETS.md's ratios, PASS/MISS, from saved runs
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from . import benchmarking


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the LoRA layer against frozen nn.Linear, cuBLAS and peft",
                       description="Time fwd and fwd+bwd, count saved bytes and peak memory, check gradients "
                                   "against peft; print a table and write the rows as JSON.")
    from .bench_e2e import E2E_PRESETS

    p.add_argument("--preset", choices=sorted([*benchmarking.PRESETS, *benchmarking.QUANT_PRESETS, *E2E_PRESETS,
                                     *benchmarking.MIXED_PRESETS]),
                   help="grid to run (default: layer on CUDA, tiny otherwise); decode/qlora (and their -tiny "
                        "CPU sizes) are the 4-bit grids; e2e/e2e-tiny time whole training steps")
    p.add_argument("--shapes", nargs="+", metavar="INxOUT",
                   help=f"replace the preset's shapes (named: {', '.join(benchmarking.SHAPES)})")
    p.add_argument("--tokens", nargs="+", type=int, metavar="N", help="replace the preset's token counts")
    p.add_argument("--dropout", nargs="+", type=float, metavar="P", help="dropouts of the fwd+bwd rows")
    from .bench_e2e import E2E_PROVIDERS

    all_providers = list(dict.fromkeys(
        [*benchmarking.LAYER_PROVIDERS, *benchmarking.DECODE_PROVIDERS, *benchmarking.QLORA_PROVIDERS, *E2E_PROVIDERS,
         *benchmarking.MIXED_PROVIDERS]))
    p.add_argument("--providers", nargs="+", choices=all_providers, metavar="NAME",
                   help=f"layer presets: {', '.join(benchmarking.LAYER_PROVIDERS)}; decode: "
                        f"{', '.join(benchmarking.DECODE_PROVIDERS)}; qlora: {', '.join(benchmarking.QLORA_PROVIDERS)}")
    p.add_argument("--modes", nargs="+", choices=benchmarking.MODES, help="subset of fwd, fwdbwd")
    p.add_argument("--adapters", nargs="+", type=int, metavar="N",
                   help="mixed/mixed-tiny presets: replace the adapter counts of the mixed batch")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="base weight and activation dtype")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up (default 25 ms)")
    p.add_argument("--rep-ms", type=float, default=120, help="do_bench / wall-clock budget per row (default 120 ms)")
    p.add_argument("--no-check", action="store_true", help="skip the gradient check against peft")
    p.add_argument("--out", type=Path, help="results JSON (default: bench/results/<device>-<UTC time>.json)")
    p.add_argument("--plot", type=Path, help="also write a PNG bar chart of time / frozen")
    p.add_argument("--compile-only", action="store_true",
                   help="only fill Triton's on-disk kernel cache: run every step once, untimed, compiling every "
                        "autotune config the timed run would try (FASTPEFT_AUTOTUNE=warm), and run the same "
                        "checks; no result file. Run several side by side before the timed runs "
                        "(bench/gpu_run.sh does)")
    p.set_defaults(func=_bench)


def _default_out(rows: list[dict]) -> Path:
    device = re.sub(r"[^a-z0-9]+", "-", rows[0]["device"].lower()).strip("-") if rows else "none"
    return Path("bench/results") / f"{device}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"


def _check_bench_args(args: argparse.Namespace) -> None:
    """Refuse sizes and rates that make no sense before anything runs, naming the flag."""
    def bad(flag: str, why: str, value) -> SystemExit:
        return SystemExit(f"fastpeft bench: --{flag} {why}, got {value!r}")

    for flag, values in (("tokens", args.tokens), ("adapters", args.adapters)):
        for v in values or ():
            if v < 1:
                raise bad(flag, "must be ≥ 1", v)
    for p in args.dropout or ():
        if not 0 <= p <= 1:
            raise bad("dropout", "must be in [0, 1]", p)
    if args.r < 1:
        raise bad("r", "must be ≥ 1", args.r)
    if args.lora_alpha is not None and not math.isfinite(args.lora_alpha):
        raise bad("lora-alpha", "must be a finite number", args.lora_alpha)
    for flag in ("warmup_ms", "rep_ms"):
        if not getattr(args, flag) > 0:
            raise bad(flag.replace("_", "-"), "must be > 0", getattr(args, flag))
    for shape in args.shapes or ():
        try:
            dims = benchmarking.parse_shape(shape)
        except ValueError as exc:
            raise SystemExit(f"fastpeft bench: --shapes: {exc}") from None
        if min(dims) < 1:
            raise bad("shapes", "sizes must be ≥ 1", shape)


def _preset_providers(preset: str) -> tuple[str, ...] | None:
    """The providers ``preset`` can run (None: a preset name the runners will refuse themselves)."""
    from .bench_e2e import E2E_PROVIDERS

    if preset in benchmarking.QUANT_PRESETS:
        kind = benchmarking.QUANT_PRESETS[preset].kind
        return benchmarking.DECODE_PROVIDERS if kind == "decode" else benchmarking.QLORA_PROVIDERS
    if preset.startswith("e2e"):
        return E2E_PROVIDERS
    if preset in benchmarking.MIXED_PRESETS:
        return benchmarking.MIXED_PROVIDERS
    if preset in benchmarking.PRESETS:
        return benchmarking.LAYER_PROVIDERS
    return None


def _bench(args: argparse.Namespace) -> int:
    from .train import resolve_device

    _check_bench_args(args)
    device = resolve_device(args.device, "fastpeft bench")
    preset = args.preset or ("layer" if device.type == "cuda" else "tiny")
    known = _preset_providers(preset)
    if args.providers and known is not None and set(args.providers) - set(known):
        raise SystemExit(f"fastpeft bench: --providers {sorted(set(args.providers) - set(known))} do not belong to "
                         f"the {preset} preset; it takes {', '.join(known)}")
    if args.plot and preset.startswith("e2e"):  # said, not refused: one script passes --plot to every preset
        print("fastpeft bench: no plot for the e2e presets (--plot ignored; the table and --json are written)",
              file=sys.stderr)
        args.plot = None
    if args.compile_only:
        benchmarking.compile_only(True)  # the check still runs: its launches (p = 0) are the timed run's too
        args.cache_before = benchmarking.triton_cache_entries()
    if preset in benchmarking.QUANT_PRESETS:
        return _bench_quant(args, preset, device)
    if preset.startswith("e2e"):
        return _bench_e2e(args, preset, device)
    if preset in benchmarking.MIXED_PRESETS:
        return _bench_mixed(args, preset, device)
    rows = benchmarking.run(preset, shapes=args.shapes, tokens=args.tokens, providers=args.providers,
                            modes=args.modes, dropouts=args.dropout, dtype=args.dtype, device=device, r=args.r,
                            lora_alpha=args.lora_alpha, check=not args.no_check, warmup_ms=args.warmup_ms,
                            rep_ms=args.rep_ms)
    failed = [r for r in rows if benchmarking.row_ok(r) is False]
    return _report(args, rows, benchmarking.format_table(rows), benchmarking.plot_rows, failed,
                   lambda r: f"GRADIENT CHECK FAILED: {r['provider']} {r['shape']} N={r['tokens']} p={r['dropout']} "
                             f"{r.get('check_errors')} (tol {r.get('check_tol')})")


def _report(args: argparse.Namespace, rows: list[dict], table: str, plot=None, failed=(), describe=None) -> int:
    """What every preset does with its rows: print the table, write the JSON (and the plot), name the failures.

    Exit status 1 when any row failed: a fast wrong kernel is not a result.
    """
    from . import targets

    if benchmarking.compile_only():
        before, after = getattr(args, "cache_before", None), benchmarking.triton_cache_entries()
        grown = f" (+{after - before})" if before is not None and after is not None else ""
        print(f"compile-only: {len(rows)} rows ran once, untimed; Triton's cache holds {after} kernels{grown}; "
              "no result file written")
        for r in failed if describe is not None else ():
            print(describe(r), file=sys.stderr)
        return 1 if failed else 0
    print(table)
    verdicts = targets.evaluate(rows)
    if verdicts:  # informational here: a missed target is reported, not an error of the run
        print("\nTARGETS.md (ratios from this run):\n" + targets.format_verdicts(verdicts))
    out = benchmarking.write_json(rows, args.out or _default_out(rows))
    print(f"\nwrote {out}")
    if args.plot and plot is not None:
        print(f"wrote {plot(rows, args.plot)}")
    for r in failed if describe is not None else ():
        print(describe(r), file=sys.stderr)
    return 1 if failed else 0


def _bench_e2e(args: argparse.Namespace, preset: str, device) -> int:
    """The end-to-end preset: one training step of a Llama-shaped model, fastpeft vs peft (bf16 and NF4)."""
    from . import bench_e2e

    providers = [p for p in (args.providers or bench_e2e.E2E_PROVIDERS) if p in bench_e2e.E2E_PROVIDERS]
    rows = []
    for i, dropout in enumerate(args.dropout or [0.1]):  # TARGETS.md §5: p=0.05 and p=0.1, both sides alike
        todo = providers if i == 0 else [p for p in providers if "frozen" not in p]  # the floors need no rerun
        rows += bench_e2e.run_e2e(preset, todo, device, r=args.r, dropout=dropout)
    failed = [r for r in rows if r["provider"] in ("fastpeft", "fastpeft_qlora") and r.get("error")]
    return _report(args, rows, bench_e2e.format_e2e(rows), failed=failed)


def _bench_mixed(args: argparse.Namespace, preset: str, device) -> int:
    """The mixed-adapter presets: n adapters × 512 tokens, fastpeft mixed vs single vs peft vs frozen."""
    rows = benchmarking.run_mixed(preset, shapes=args.shapes, adapters=args.adapters, providers=args.providers,
                                  modes=args.modes, dtype=args.dtype, device=device, r=args.r,
                                  lora_alpha=args.lora_alpha, check=not args.no_check, warmup_ms=args.warmup_ms,
                                  rep_ms=args.rep_ms)
    failed = [r for r in rows if r.get("check_ok") is False]
    return _report(args, rows, benchmarking.format_mixed_table(rows), benchmarking.plot_mixed_rows, failed,
                   lambda r: f"FAILED: {r['provider']} {r['shape']} adapters={r['adapters']}: {r.get('check_errors')}")


def _bench_quant(args: argparse.Namespace, preset: str, device) -> int:
    """The 4-bit presets (decode, qlora): same output files, their own table."""
    rows = benchmarking.run_quant(preset, shapes=args.shapes, tokens=args.tokens, providers=args.providers,
                                  dropouts=args.dropout, dtype=args.dtype, device=device, r=args.r,
                                  lora_alpha=args.lora_alpha, check=not args.no_check, warmup_ms=args.warmup_ms,
                                  rep_ms=args.rep_ms)
    # bnb's bare GEMV refusing N > 1 is expected; a fastpeft provider that fails is not.
    failed = [r for r in rows if benchmarking.row_ok(r) is False
              or (r["provider"].startswith("fastpeft") and "error" in r)]
    return _report(args, rows, benchmarking.format_quant_table(rows), benchmarking.plot_rows, failed,
                   lambda r: f"FAILED: {r['provider']} {r['shape']} N={r['tokens']}: "
                             f"{r.get('error') or r.get('check_errors')}")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from . import train

    p = sub.add_parser("train", help="fine-tune a causal LM (LoRA, QLoRA, …); with no flags, the embedded default",
                       description="QLoRA-style fine-tuning. With no --model/--data: a tiny Llama-style model "
                                   "built from a shipped config learns a shipped task (nothing downloaded).")
    train.add_train_arguments(p)
    p.set_defaults(func=train.main)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from . import generate

    p = sub.add_parser("generate", help="load a base model and an adapter and generate for a prompt")
    generate.add_arguments(p)
    p.set_defaults(func=generate.main)


def _add_estimate(sub: argparse._SubParsersAction) -> None:
    from . import estimate

    p = sub.add_parser("estimate", help="training memory estimate (rule of thumb and component-wise; --measure)")
    estimate.add_arguments(p)
    p.set_defaults(func=estimate.main)


def _add_targets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("targets", help="check saved benchmark results against TARGETS.md's targets",
                       description="For each fastpeft bench JSON file (one run each), print every target its "
                                   "rows reach: the measured ratio, the bound, PASS or MISS. Exit status 1 "
                                   "when any target is missed.")
    p.add_argument("files", nargs="+", help="fastpeft bench JSON files")

    def run(args: argparse.Namespace) -> int:
        from . import targets

        return targets.main(args.files)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpeft", description="fused LoRA fine-tuning for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_generate(sub)
    _add_estimate(sub)
    _add_bench(sub)
    _add_targets(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fastpeft`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.config:
        from . import train

        args = train.parse_args(argv[1:])  # the config file's keys become defaults under explicit flags
        args.func = train.main
    return args.func(args)
