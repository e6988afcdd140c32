"""An SVG of a Skill-It run's mixture trajectory, from its metrics.jsonl (no plotting library).

Two panels over the update count: the mixture (p per training skill, as logged at
each round's start) and the validation loss per skill that set it. Written by
the ctc recipe as `output_dir/mixture.svg`; for any run directory:

    python -m speechlm.training.mixture_plot RUN_DIR [OUT.svg]
"""

from __future__ import annotations

import sys
from html import escape
from pathlib import Path

from ..jsonl import atomic_write
from .metrics_log import METRICS_FILE, read_metrics

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
WIDTH, HEIGHT, MARGIN = 360, 240, 48


def write_mixture_svg(metrics, out) -> Path | None:
    """Plot the "mixture" records of `metrics` (a metrics.jsonl or its run directory) into
    `out`; None (nothing written) when there are none."""
    path = Path(metrics)
    if not (path / METRICS_FILE if path.is_dir() else path).is_file():
        return None
    records = [r for r in read_metrics(path, split="mixture") if isinstance(r.get("step"), int)]
    if not records:
        return None
    steps = [r["step"] for r in records]
    panels = [("mixture p", _series(records, "p_"), 1.0),
              ("validation loss", _series(records, "val_loss_"), None)]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * WIDTH}" height="{HEIGHT}" '
             'font-family="sans-serif" font-size="11">',
             f'<rect width="{2 * WIDTH}" height="{HEIGHT}" fill="white"/>']
    for n, (title, series, top) in enumerate(panels):
        parts.append(_panel(n * WIDTH, title, steps, series, top))
    parts.append("</svg>")
    out = Path(out)
    with atomic_write(out) as f:
        f.write("\n".join(parts) + "\n")
    return out


def _series(records: list[dict], prefix: str) -> dict[str, list[float | None]]:
    names = [k for k in records[0] if k.startswith(prefix)]
    return {name[len(prefix):]: [r.get(name) for r in records] for name in names}


def _panel(left: int, title: str, steps: list[int], series: dict, top: float | None) -> str:
    values = [v for vs in series.values() for v in vs if v is not None]
    y_max = top if top is not None else (max(values) * 1.1 if values and max(values) > 0
                                         else 1.0)
    x_max = max(max(steps), 1)
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    def x(step: float) -> float:
        return left + MARGIN + plot_w * step / x_max

    def y(value: float) -> float:
        return MARGIN + plot_h * (1 - value / y_max)

    out = [f'<text x="{left + WIDTH / 2}" y="{MARGIN / 2}" text-anchor="middle" '
           f'font-size="13">{escape(title)}</text>',
           f'<rect x="{left + MARGIN}" y="{MARGIN}" width="{plot_w}" height="{plot_h}" '
           'fill="none" stroke="#888"/>']
    for frac in (0.0, 0.5, 1.0):  # axis labels
        out.append(f'<text x="{left + MARGIN - 4}" y="{y(frac * y_max) + 4:.1f}" '
                   f'text-anchor="end">{frac * y_max:.3g}</text>')
        out.append(f'<text x="{x(frac * x_max):.1f}" y="{MARGIN + plot_h + 14}" '
                   f'text-anchor="middle">{round(frac * x_max)}</text>')
    out.append(f'<text x="{left + WIDTH / 2}" y="{HEIGHT - 8}" text-anchor="middle">'
               'update</text>')
    for n, (name, vals) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        points = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, vals, strict=True)
                          if v is not None)
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{left + WIDTH - MARGIN + 4}" y="{MARGIN + 12 + 14 * n}" '
                   f'fill="{colour}">{escape(name)}</text>')
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m speechlm.training.mixture_plot RUN_DIR [OUT.svg]",
              file=sys.stderr)
        return 2
    run = Path(args[0])
    out = Path(args[1]) if len(args) == 2 else (run if run.is_dir() else run.parent) \
        / "mixture.svg"
    if write_mixture_svg(run, out) is None:
        print(f"{run}: no Skill-It mixture records (split 'mixture') in its metrics",
              file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
