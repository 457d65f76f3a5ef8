"""The metric maths of ``python -m producer evaluate``: per-model scores, the cascade band grid, the summary table.

Needs the ``eval`` extra (scikit-learn, NumPy); imported only by the ``evaluate`` command. Spam is
the positive class throughout: ``y`` is 1 for spam, ``predicted`` is the label each result carries
(1 for spam) and ``scores`` the results' ``spam_score``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

STEP = 0.05
NEAR_EXAONE = 0.005
"""A band whose cascade F1 is within this of EXAONE alone counts as matching EXAONE."""


def binary_metrics(y: Sequence[int], predicted: Sequence[int], scores: Sequence[float]) -> dict:
    """Accuracy, precision, recall, F1 and the confusion counts from the predicted labels; ROC AUC,
    average precision (``pr_auc``), Brier score and the F1-best threshold from the scores. With one
    class only, the ranking metrics are ``None`` and ``notes`` says why."""
    y_true = np.asarray(y, dtype=int)
    y_pred = np.asarray(predicted, dtype=int)
    s = np.asarray(scores, dtype=float)
    if not len(y_true) == len(y_pred) == len(s):
        raise ValueError("y, predicted and scores differ in length")
    out: dict = {"n": int(len(y_true))}
    if len(y_true) == 0:
        return {**out, **dict.fromkeys(("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "brier",
                                        "best_f1_threshold", "best_f1")),
                "confusion": {"tp": 0, "fp": 0, "tn": 0, "fn": 0}, "notes": ["no scored records"]}
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel())
    out.update(
        accuracy=float(accuracy_score(y_true, y_pred)),
        precision=float(precision_score(y_true, y_pred, zero_division=0)),
        recall=float(recall_score(y_true, y_pred, zero_division=0)),
        f1=float(f1_score(y_true, y_pred, zero_division=0)),
        confusion={"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        brier=float(brier_score_loss(y_true, s, pos_label=1)),
    )
    if len(np.unique(y_true)) < 2:
        only = "spam" if y_true[0] == 1 else "ham"
        out.update(roc_auc=None, pr_auc=None, best_f1_threshold=None, best_f1=None,
                   notes=[f"every label is {only}: ROC AUC, PR AUC and the best-F1 threshold need both classes"])
        return out
    out.update(roc_auc=float(roc_auc_score(y_true, s)), pr_auc=float(average_precision_score(y_true, s)))
    out.update(best_f1_threshold(y_true, s))
    return out


def best_f1_threshold(y: np.ndarray, scores: np.ndarray) -> dict:
    """The score threshold (label spam when ``score >= threshold``) with the highest F1 on this data."""
    precision, recall, thresholds = precision_recall_curve(y, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1))
    return {"best_f1_threshold": float(thresholds[best]), "best_f1": float(f1[best])}


def grid(step: float = STEP) -> list[tuple[float, float]]:
    """Bands ``[low, high]`` with ``low`` in 0..0.5 and ``high`` in 0.5..1 by ``step``: symmetric
    and asymmetric ones, from escalating (almost) nothing, ``[0.5, 0.5]``, to everything, ``[0, 1]``,
    which is EXAONE alone; so a band matching EXAONE always exists."""
    count = round(0.5 / step)
    return [(round(i * step, 4), round(0.5 + j * step, 4)) for i in range(count + 1) for j in range(count + 1)]


def cascade_labels(koelectra: np.ndarray, exaone: np.ndarray, band: tuple[float, float] | None,
                   threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What ``auto`` decides at ``band``: a KoELECTRA score in ``[low, high]`` (inclusive) takes
    EXAONE's label and score. Returns the labels, the deciding scores and the escalated mask."""
    if band is None:
        escalated = np.zeros(len(koelectra), dtype=bool)
    else:
        escalated = (koelectra >= band[0]) & (koelectra <= band[1])
    scores = np.where(escalated, exaone, koelectra)
    return (scores >= threshold).astype(int), scores, escalated


def cascade(y: Sequence[int], koelectra: Sequence[float], exaone: Sequence[float], threshold: float,
            configured: tuple[float, float] | None, step: float = STEP) -> dict:
    """The escalated fraction and F1 of the cascade for every band of :func:`grid` (plus the
    configured band), the configured band's entry, and the narrowest band (smallest escalated
    fraction, then the narrower band) whose F1 is within :data:`NEAR_EXAONE` of EXAONE alone."""
    y_true = np.asarray(y, dtype=int)
    k, e = np.asarray(koelectra, dtype=float), np.asarray(exaone, dtype=float)
    f1_of = lambda labels: float(f1_score(y_true, labels, zero_division=0))  # noqa: E731
    exaone_f1 = f1_of((e >= threshold).astype(int))
    bands = grid(step)
    if configured is not None and configured not in bands:
        bands.append(configured)
    rows = []
    for band in [None, *bands]:
        labels, _, escalated = cascade_labels(k, e, band, threshold)
        rows.append({"low": None if band is None else band[0], "high": None if band is None else band[1],
                     "escalated": float(escalated.mean()) if len(k) else 0.0, "f1": f1_of(labels),
                     "configured": band == configured})
    near = [r for r in rows if r["f1"] >= exaone_f1 - NEAR_EXAONE]
    narrowest = min(near, key=lambda r: (r["escalated"], 0.0 if r["low"] is None else r["high"] - r["low"]))
    return {
        "threshold": threshold,
        "grid": f"low 0..0.5 x high 0.5..1 in steps of {step}, plus no escalation (low/high null) and the "
                "configured band; a KoELECTRA score in [low, high] takes EXAONE's label",
        "n": int(len(y_true)),
        "koelectra_f1": rows[0]["f1"],
        "exaone_f1": exaone_f1,
        "configured": next(r for r in rows if r["configured"]),
        "narrowest_near_exaone": {**narrowest, "tolerance": NEAR_EXAONE,
                                  "rule": "the smallest escalated fraction (then the narrowest band) whose F1 is "
                                          "at least EXAONE alone's minus the tolerance"},
        "bands": rows,
    }


def summary(report: dict) -> str:
    """A short table for stderr."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"{report['records']} records ({report['labels']['spam']} spam, {report['labels']['ham']} ham), "
             f"threshold {report['threshold']}",
             f"{'model':<10} {'n':>6} {'err':>4} {'acc':>6} {'prec':>6} {'recall':>6} {'f1':>6} {'roc_auc':>7} "
             f"{'pr_auc':>6} {'brier':>6} {'msg/s':>8}"]
    for name, m in report["models"].items():
        rate = "derived" if m.get("derived") else "-" if m["messages_per_second"] is None else \
            f"{m['messages_per_second']:.1f}"
        lines.append(f"{name:<10} {m['n']:>6} {m['errors']:>4} {fmt(m['accuracy']):>6} {fmt(m['precision']):>6} "
                     f"{fmt(m['recall']):>6} {fmt(m['f1']):>6} {fmt(m['roc_auc']):>7} {fmt(m['pr_auc']):>6} "
                     f"{fmt(m['brier']):>6} {rate:>8}")
        for part in m.get("by_version", ()):
            lines.append(f"  {part['model_version']} {part['model_precision']}: n {part['n']}, "
                         f"acc {fmt(part['accuracy'])}, f1 {fmt(part['f1'])}, roc_auc {fmt(part['roc_auc'])}, "
                         f"brier {fmt(part['brier'])}")
        lines.extend(f"  note: {note}" for note in m.get("notes", ()))
    if cascade := report.get("cascade"):
        band = lambda r: "none (no escalation)" if r["low"] is None else f"{r['low']:g},{r['high']:g}"  # noqa: E731
        c, near = cascade["configured"], cascade["narrowest_near_exaone"]
        lines.append(f"cascade at band {band(c)}: {c['escalated']:.1%} escalated, F1 {c['f1']:.3f} "
                     f"(EXAONE alone {cascade['exaone_f1']:.3f}); narrowest within {near['tolerance']} of EXAONE: "
                     f"{band(near)}, {near['escalated']:.1%} escalated, F1 {near['f1']:.3f}")
    return "\n".join(lines)
