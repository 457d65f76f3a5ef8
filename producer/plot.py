"""The figure of ``python -m producer evaluate --plot``: one PNG with, per model, the score histograms
of each class, the precision-recall curves and, with ``--model all``, the escalated fraction vs F1
of the cascade bands. Needs the ``eval`` extra; draws with the Agg backend (no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve  # noqa: E402


def draw(path: Path, y, runs: dict, cascade: dict | None, threshold: float) -> None:
    """``runs`` maps a model name to its :class:`producer.evaluate.Run`; ``cascade`` is the report's
    cascade section or ``None``."""
    labels = np.frombuffer(y, dtype=np.int8)
    panels = len(runs) + 1 + (cascade is not None)
    rows = (panels + 1) // 2
    fig, grid = plt.subplots(rows, 2, figsize=(11, 4.2 * rows), squeeze=False)
    axes = list(grid.flat)
    for spare in axes[panels:]:
        spare.set_visible(False)
    axes = axes[:panels]
    bins = np.linspace(0.0, 1.0, 21)
    pr = axes[len(runs)]
    for ax, (name, run) in zip(axes, runs.items(), strict=False):
        scores = np.frombuffer(run.scores, dtype=float)
        ok = ~np.isnan(scores)
        for value, label, color in ((0, "ham", "tab:blue"), (1, "spam", "tab:red")):
            ax.hist(scores[ok & (labels == value)], bins=bins, alpha=0.6, color=color, label=label)
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set(title=f"{name}: spam score by class", xlabel="spam score", ylabel="messages", xlim=(0, 1))
        ax.legend()
        if len(np.unique(labels[ok])) == 2:
            precision, recall, _ = precision_recall_curve(labels[ok], scores[ok])
            pr.plot(recall, precision, label=name)
    pr.set(title="precision-recall", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.05))
    if pr.get_legend_handles_labels()[0]:
        pr.legend()
    else:
        pr.text(0.5, 0.5, "one class only:\nno curve", ha="center", va="center")
    if cascade is not None:
        ax = axes[-1]
        bands = sorted(cascade["bands"], key=lambda r: (r["escalated"], -r["f1"]))
        ax.scatter([r["escalated"] for r in bands], [r["f1"] for r in bands], s=10, color="gray", label="band")
        frontier, best = [], -1.0
        for r in bands:  # the best F1 reached at each escalated fraction or less
            best = max(best, r["f1"])
            frontier.append((r["escalated"], best))
        ax.plot(*zip(*frontier, strict=True), color="tab:green", label="best so far")
        ax.axhline(cascade["exaone_f1"], color="tab:orange", linestyle="--", label="EXAONE alone")
        for key, marker, text in (("configured", "o", "configured"), ("narrowest_near_exaone", "*", "narrowest")):
            r = cascade[key]
            ax.scatter([r["escalated"]], [r["f1"]], marker=marker, s=120, zorder=3, label=text)
        ax.set(title="cascade: escalated fraction vs F1", xlabel="escalated to EXAONE", ylabel="F1", xlim=(-0.02, 1.02))
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
