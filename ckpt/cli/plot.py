"""``ckpt plot``: a metric over the run, every save (evicted ones too), kept checkpoints marked."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import policy
from ..catalog import history
from . import common
from .common import UsageError

WIDTH, HEIGHT = 64, 16
#: Terminal marks, strongest first: best, latest, milestone, other kept, evicted.
MARKS = (("B", "best"), ("L", "latest"), ("M", "milestone"), ("o", "kept"), (".", "evicted"))


def add(sub: Any) -> None:
    pl = sub.add_parser("plot", help="a metric over steps, kept checkpoints marked (PNG or terminal)",
                        description="Draw a metric over the run's steps: every save the run made (evicted "
                                    "checkpoints too, from ckpt-history.jsonl), with the kept checkpoints "
                                    "marked (best, milestones, latest). With -o a PNG (needs matplotlib: "
                                    "pip install 'ckpt[plot]'); without it, a chart in the terminal.",
                        epilog="example:\n  ckpt plot runs/exp1 --metric val_loss -o curve.png\n"
                               "  ckpt plot runs/exp1 --metric val_acc --mode max")
    pl.add_argument("directory", help="the run directory")
    pl.add_argument("--metric", required=True, help="the metric to draw (a key of save(metrics=...))")
    pl.add_argument("--mode", choices=("min", "max"), help="which end is best (default: the recorded "
                                                           "policy's mode for this metric, else min)")
    pl.add_argument("-o", "--output", metavar="PNG", help="write a PNG instead of drawing in the terminal")
    pl.set_defaults(run=cmd_plot)


@dataclass
class Point:
    x: int
    y: float
    tags: List[str]  #: the kinds of mark, from MARKS' names


def points(directory: Any, metric: str, mode: Optional[str]) -> Tuple[List[Point], str]:
    """The metric's points (x = step, or epoch when every step is the same) and the x label."""
    cat = common.catalog(directory)
    records = cat.scan().records
    entries = history.merged(history.read(cat.store), records)
    if not entries:
        raise UsageError("no saves recorded: nothing to plot", path=directory,
                         hint="pass the run directory given to CheckpointManager")
    with_metric = [e for e in entries if metric in e.metrics]
    if not with_metric:
        names = sorted({k for e in entries for k in e.metrics})
        raise UsageError(f"no save recorded the metric {metric!r}", path=directory,
                         hint=f"recorded metrics: {', '.join(names)}" if names else "no save recorded any metric")
    recorded, _ = common.recorded(cat)
    if mode is None:
        mode = recorded.mode if recorded is not None and recorded.monitor == metric else "min"
    kept = {r.key: r for r in records}
    best = {r.key for r in policy.best([r for r in records if math.isfinite(r.metrics.get(metric, math.nan))],
                                       metric, mode, 1)}
    latest = max(kept) if kept else None
    every = recorded.keep_every if recorded is not None else None
    by_epoch = len({e.step for e in with_metric}) == 1
    out: List[Point] = []
    for e in with_metric:
        tags: List[str] = []
        if e.key in kept:
            tags += ["best"] if e.key in best else []
            tags += ["latest"] if e.key == latest else []
            tags += ["milestone"] if every and policy.is_milestone(kept[e.key], every) else []
            tags.append("kept")
        else:
            tags.append("evicted")
        out.append(Point(e.epoch if by_epoch else e.step, e.metrics[metric], tags))
    return out, "epoch" if by_epoch else "step"


def cmd_plot(args: argparse.Namespace) -> int:
    directory = common.run_directory(args.directory)
    pts, xlabel = points(directory, args.metric, args.mode)
    finite = [p for p in pts if math.isfinite(p.y)]
    if not finite:
        raise UsageError(f"every recorded value of {args.metric!r} is NaN or infinite", path=directory,
                         hint="plot another metric")
    if args.output:
        png(finite, xlabel, args.metric, directory, Path(args.output))
        print(f"wrote {args.output}: {len(pts)} saves of {args.metric}, {sum('kept' in p.tags for p in pts)} kept")
    else:
        for line in terminal(finite, xlabel, args.metric):
            print(line)
    skipped = len(pts) - len(finite)
    if skipped:
        print(f"({skipped} NaN or infinite values not drawn)")
    return 0


def terminal(pts: Sequence[Point], xlabel: str, metric: str, width: int = WIDTH, height: int = HEIGHT) -> List[str]:
    """A plain-text chart: one character per save, the strongest mark wins a cell."""
    xs, ys = [p.x for p in pts], [p.y for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    grid = [[" "] * width for _ in range(height)]
    rank = {name: i for i, (_, name) in enumerate(MARKS)}
    strength: Dict[Tuple[int, int], int] = {}
    for p in pts:
        col = round((p.x - x0) / (x1 - x0) * (width - 1)) if x1 > x0 else 0
        row = height - 1 - (round((p.y - y0) / (y1 - y0) * (height - 1)) if y1 > y0 else 0)
        r = min(rank[t] for t in p.tags)
        if r < strength.get((row, col), len(MARKS)):
            strength[(row, col)] = r
            grid[row][col] = MARKS[r][0]
    labels = {0: f"{y1:.4g}", height // 2: f"{(y0 + y1) / 2:.4g}", height - 1: f"{y0:.4g}"}
    pad = max(len(s) for s in labels.values())
    lines = [f"{metric} over {xlabel}s"]
    lines += [f"{labels.get(i, ''):>{pad}} |{''.join(row).rstrip()}" for i, row in enumerate(grid)]
    lines.append(" " * pad + " +" + "-" * width)
    left, right = str(x0), str(x1)
    lines.append(" " * (pad + 2) + left + right.rjust(width - len(left)) + f"  {xlabel}")
    lines.append("  ".join(f"{c} {name}" for c, name in MARKS))
    return lines


def png(pts: Sequence[Point], xlabel: str, metric: str, directory: Any, out: Path) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise UsageError("writing a PNG needs matplotlib", hint="pip install 'ckpt[plot]', or leave out -o "
                                                                 "for a chart in the terminal") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    kinds = fig.canvas.get_supported_filetypes()
    if out.suffix and out.suffix.lower().lstrip(".") not in kinds:  # no suffix: matplotlib adds .png
        plt.close(fig)
        raise UsageError(f"matplotlib cannot write {out.suffix!r} images, so nothing was written", path=out,
                         hint=f"name the image OUT.png (or .{', .'.join(sorted(k for k in kinds if k != 'png'))})")
    ax.plot([p.x for p in pts], [p.y for p in pts], "-", color="0.6", lw=1.2, zorder=1, label="every save")
    styles = (("evicted", dict(marker="o", color="0.7", s=14)),
              ("kept", dict(marker="o", color="tab:blue", s=36)),
              ("milestone", dict(marker="s", color="tab:green", s=60)),
              ("latest", dict(marker="^", color="tab:orange", s=90)),
              ("best", dict(marker="*", color="tab:red", s=200)))
    for tag, style in styles:
        sel = [p for p in pts if tag in p.tags]
        if sel:
            ax.scatter([p.x for p in sel], [p.y for p in sel], zorder=3, label=f"{tag} ({len(sel)})",
                       edgecolors="black" if tag != "evicted" else "none", linewidths=0.5, **style)  # type: ignore[arg-type]
    for p in pts:
        if "best" in p.tags:
            ax.annotate(f"best {p.y:.4g}", (p.x, p.y), textcoords="offset points", xytext=(6, 8), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(f"{str(directory).rstrip('/').rsplit('/', 1)[-1]}: {metric}")  # a path or a URL
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
