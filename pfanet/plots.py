"""The figures SOD papers show: precision-recall curves and F-measure-vs-threshold curves, one line per method and
one figure per dataset. Drawn with matplotlib's Agg canvas directly, so no display and no pyplot global state."""

from __future__ import annotations

import os
import pathlib
import re

import numpy as np

from .evaluate import BETA2, Report


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _file_name(dataset: str) -> str:
    return re.sub(r"[^\w.-]+", "_", dataset) or "dataset"


def plot_curves(report: Report, folder: str | os.PathLike) -> list[pathlib.Path]:
    """Write <dataset>_pr.png (mean precision against mean recall over the 256 thresholds) and <dataset>_fm.png
    (the F-measure curve, averaged over images, against the threshold) for each dataset. Returns the files."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    datasets = list(dict.fromkeys(d for ds in report.values() for d in ds))
    written = []
    for dataset in datasets:
        lines = {m: ds[dataset] for m, ds in report.items() if dataset in ds and ds[dataset].fmeasure.size}
        if not lines:
            continue
        pr, ax_pr = _figure(f"{dataset}: precision-recall", "recall", "precision")
        fm, ax_fm = _figure(f"{dataset}: F-measure (β²={BETA2})", "threshold", "F-measure")
        for method, s in lines.items():
            ax_pr.plot(s.recall, s.precision, label=f"{method} (maxF_pr {s.metrics['maxF_pr']:.3f})")
            ax_fm.plot(np.arange(s.fmeasure.size), s.fmeasure, label=f"{method} (maxF {s.metrics['maxF']:.3f})")
        ax_pr.set(xlim=(0, 1), ylim=(0, 1.01))
        ax_fm.set(xlim=(0, 255), ylim=(0, 1.01))
        for fig, ax, suffix in ((pr, ax_pr, "pr"), (fm, ax_fm, "fm")):
            ax.legend(loc="lower left", fontsize="small")
            fig.tight_layout()
            path = folder / f"{_file_name(dataset)}_{suffix}.png"
            fig.savefig(path)
            written.append(path)
    return written
