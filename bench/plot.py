"""Plot a results JSON from ``fastpeft bench``: time / frozen per cell, mode and provider.

    python bench/plot.py bench/results/nvidia-h100-80gb-hbm3-20261128T120000Z.json [out.png]

The drawing itself is ``fastpeft.benchmarking.plot_rows``, inside the package
because ``fastpeft bench --plot`` must work from an installed copy, where
this folder does not exist.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastpeft.benchmarking import load_json, plot_rows


def plot_file(results: str | Path, png: str | Path | None = None) -> Path:
    """Draw ``results`` (a ``fastpeft bench`` JSON) into ``png`` (default: beside it, ``.png``)."""
    results = Path(results)
    return plot_rows(load_json(results), png or results.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="JSON written by fastpeft bench")
    parser.add_argument("png", type=Path, nargs="?", help="output image (default: the JSON's name, .png)")
    args = parser.parse_args(argv)
    print(plot_file(args.results, args.png))


if __name__ == "__main__":
    main()
