"""``python -m producer evaluate``: score a labeled file through the fleet and report how each model does.

The file (``.csv`` or ``.jsonl``, a text field and a ``spam``/``ham``, ``스팸``/``정상``, ``1``/``0`` or
``true``/``false`` label) is read twice, lazily: once to check every record and count the labels before anything is
sent, then once per model, streamed through :meth:`SpamClient.classify_many` (``spam.classify_batch``
tasks, at most ``window`` in flight). Only the labels, scores and predicted labels are kept, as
compact arrays. With ``--model all`` KoELECTRA and EXAONE each score every message, one after the
other (so each pass's messages per second are its own), and the report adds the cascade over a
grid of bands and an ``auto`` entry derived from the two score sets at the configured band.

A fleet can serve one model in several ``(model_version, precision)`` pairs (a retrained adapter
rolling out; bfloat16 GPU hosts beside float32 CPU ones): a model's entry then also reports each
pair's own metrics, under ``by_version`` (``model_precision`` there and in the entry: ``precision`` is
the metric). Records the workers could not score are counted; the
command fails when there are more than ``--max-errors`` (:func:`failed_records`).

The metric maths is in :mod:`producer.metrics_report`, the figure in :mod:`producer.plot`; both need
the ``eval`` extra (scikit-learn, matplotlib), which the producer's base install leaves out.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dotenv import load_dotenv

from producer.files import detect_format, read_labeled

EXTRA_HINT = "evaluate needs the eval extra (scikit-learn, matplotlib): pip install '.[eval]'"
DEFAULT_THRESHOLD = 0.5
DEFAULT_BAND = "0.2,0.8"
CHOICES = ("auto", "koelectra", "exaone", "all")
UNKNOWN = "unknown"
"""The version or precision of a result that names none (a worker of an older release)."""


class EvaluationError(ValueError):
    """The evaluation cannot start: a bad file, label, setting or option. One line, naming it."""


class MissingExtra(ImportError):
    """scikit-learn or matplotlib is not installed."""


def require_extra(plot: bool) -> None:
    """Fail with :data:`EXTRA_HINT` unless the libraries the report (and the figure) need import."""
    try:
        import numpy  # noqa: F401
        import sklearn.metrics  # noqa: F401

        if plot:
            import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtra(EXTRA_HINT) from None


def parse_band(raw: str, source: str = "CASCADE_BAND") -> tuple[float, float] | None:
    """``"low,high"`` with ``0 <= low <= high <= 1``, or ``None`` for an empty value (no escalation)."""
    if not raw.strip():
        return None
    parts = [p.strip() for p in raw.split(",")]
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise EvaluationError(f"{source}: {raw!r} is not two numbers low,high (e.g. 0.2,0.8), or empty") from None
    if not 0.0 <= low <= high <= 1.0:
        raise EvaluationError(f"{source}: {raw!r} is not low,high with 0 <= low <= high <= 1")
    return low, high


def settings_from_env(band_option: str | None = None) -> tuple[float, tuple[float, float] | None, str]:
    """``SPAM_THRESHOLD`` and ``CASCADE_BAND`` the way the workers read them (environment, then
    ``./.env``); ``--band`` overrides the band. Returns the threshold, the band and the band's source."""
    load_dotenv(Path.cwd() / ".env", override=False)
    raw = os.environ.get("SPAM_THRESHOLD", str(DEFAULT_THRESHOLD))
    try:
        threshold = float(raw)
    except ValueError:
        raise EvaluationError(f"SPAM_THRESHOLD: {raw!r} is not a number") from None
    if not 0.0 <= threshold <= 1.0:
        raise EvaluationError(f"SPAM_THRESHOLD: {raw!r} is not between 0 and 1")
    if band_option is not None:
        return threshold, parse_band(band_option, "--band"), "--band"
    source = "CASCADE_BAND" if "CASCADE_BAND" in os.environ else "default"
    return threshold, parse_band(os.environ.get("CASCADE_BAND", DEFAULT_BAND)), source


@dataclass
class Labeled:
    """The checked input: its format and every record's label (1 spam, 0 ham)."""

    path: Path
    fmt: str
    field: str
    label_field: str
    y: array = field(default_factory=lambda: array("b"))

    def texts(self):
        return (text for text, _ in read_labeled(self.path, self.fmt, self.field, self.label_field))


def scan(path: Path, field_name: str = "text", label_field: str = "label", fmt: str | None = None) -> Labeled:
    """Read the whole file once: a bad record or label fails here, naming its line, before anything is sent."""
    if not path.is_file():
        raise EvaluationError(f"{path}: no such file")
    labeled = Labeled(path, detect_format(path, ("csv", "jsonl"), fmt), field_name, label_field)
    for _, is_spam in read_labeled(path, labeled.fmt, field_name, label_field):
        labeled.y.append(int(is_spam))
    if not labeled.y:
        raise EvaluationError(f"{path}: no records")
    return labeled


@dataclass
class Run:
    """One model's pass: per record its score and label (NaN and -1 for an item error)."""

    model: str
    scores: array = field(default_factory=lambda: array("d"))
    predicted: array = field(default_factory=lambda: array("b"))
    escalated: int = 0
    errors: int = 0
    versions: set = field(default_factory=set)
    precisions: set = field(default_factory=set)
    koelectra_versions: set = field(default_factory=set)
    elapsed_s: float = 0.0
    pairs: dict = field(default_factory=dict)
    """``{(model_version, precision): index}`` of the pairs that decided, in the order first seen."""
    pair_of: array = field(default_factory=lambda: array("i"))
    """Per record, the index of its pair in :attr:`pairs` (-1 for an item error)."""

    def add(self, result: dict) -> None:
        if "error" in result:
            self.errors += 1
            self.scores.append(math.nan)
            self.predicted.append(-1)
            self.pair_of.append(-1)
            return
        self.scores.append(float(result["spam_score"]))
        self.predicted.append(int(result["label"] == "spam"))
        self.escalated += bool(result.get("escalated"))
        if "model_version" in result:
            self.versions.add(result["model_version"])
        if "precision" in result:
            self.precisions.add(result["precision"])
        if "koelectra_version" in result:
            self.koelectra_versions.add(result["koelectra_version"])
        pair = (result.get("model_version") or UNKNOWN, result.get("precision") or UNKNOWN)
        self.pair_of.append(self.pairs.setdefault(pair, len(self.pairs)))


def classify_all(client, labeled: Labeled, model: str, chunk_size: int = 64, window: int = 8,
                 progress: Callable[[int], object] = lambda n: None) -> Run:
    """Stream the file through the fleet for ``model``; task failures and timeouts propagate."""
    run = Run(model)
    start = time.monotonic()
    for result in client.classify_many(labeled.texts(), model, chunk_size=chunk_size, window=window):
        run.add(result)
        progress(1)
    run.elapsed_s = time.monotonic() - start
    if len(run.scores) != len(labeled.y):
        raise EvaluationError(f"{labeled.path}: {len(run.scores)} results for {len(labeled.y)} records "
                              "(did the file change while it was evaluated?)")
    return run


def version_field(versions: set) -> str | list | None:
    """One version as a string, several as a sorted list, none (the field absent) as ``None``."""
    if not versions:
        return None
    return next(iter(versions)) if len(versions) == 1 else sorted(map(str, versions))


def model_entry(y, run: Run, threshold: float) -> dict:
    """The metrics of one model's pass from the labels its results carry; a note when those labels
    disagree with ``spam_score >= threshold`` (the workers run with another ``SPAM_THRESHOLD``)."""
    import numpy as np

    from producer.metrics_report import binary_metrics

    scores = np.frombuffer(run.scores, dtype=float)
    ok = ~np.isnan(scores)
    labels = np.frombuffer(y, dtype=np.int8)
    entry = {"model_version": version_field(run.versions)}
    if run.precisions:  # "precision" is the metric: this is what the weights computed in
        entry["model_precision"] = version_field(run.precisions)
    if run.koelectra_versions:
        entry["koelectra_version"] = version_field(run.koelectra_versions)
    all_predicted = np.frombuffer(run.predicted, dtype=np.int8)
    predicted = all_predicted[ok]
    entry.update(binary_metrics(labels[ok], predicted, scores[ok]))
    if len(run.pairs) > 1:
        pair_of = np.frombuffer(run.pair_of, dtype=np.int32)
        entry["by_version"] = [
            {"model_version": version, "model_precision": precision,
             **binary_metrics(labels[pair_of == i], all_predicted[pair_of == i], scores[pair_of == i])}
            for (version, precision), i in sorted(run.pairs.items())
        ]
    if disagree := int(((scores[ok] >= threshold) != (predicted == 1)).sum()):
        entry.setdefault("notes", []).append(
            f"{disagree} labels disagree with spam_score >= {threshold}: the workers use another SPAM_THRESHOLD")
    entry["errors"] = run.errors
    if run.model == "auto":
        entry["escalated"] = run.escalated / max(1, int(ok.sum()))
    entry["elapsed_s"] = round(run.elapsed_s, 3)
    entry["messages_per_second"] = round(len(run.scores) / run.elapsed_s, 2) if run.elapsed_s > 0 else None
    return entry


def failed_records(runs: dict[str, Run]) -> int:
    """Records that some pass could not score (an item error), each counted once."""
    import numpy as np

    failed = None
    for run in runs.values():
        mask = np.isnan(np.frombuffer(run.scores, dtype=float))
        failed = mask if failed is None else failed | mask
    return int(failed.sum()) if failed is not None else 0


def derived_auto(y, koelectra: Run, exaone: Run, band, threshold: float) -> tuple[dict, dict | None]:
    """The ``auto`` entry computed from both score sets at ``band``, and the cascade section
    (``None`` when no record has both scores)."""
    import numpy as np

    from producer.metrics_report import binary_metrics, cascade, cascade_labels

    labels = np.frombuffer(y, dtype=np.int8)
    k, e = np.frombuffer(koelectra.scores, dtype=float), np.frombuffer(exaone.scores, dtype=float)
    ok = ~(np.isnan(k) | np.isnan(e))
    predicted, scores, escalated = cascade_labels(k[ok], e[ok], band, threshold)
    kept, sent = not escalated.all(), escalated.any()
    deciders = (koelectra.versions if kept else set()) | (exaone.versions if sent else set())
    precisions = (koelectra.precisions if kept else set()) | (exaone.precisions if sent else set())
    entry = {"derived": "cascade at the configured band", "band": None if band is None else list(band),
             "model_version": version_field(deciders)}
    if precisions:
        entry["model_precision"] = version_field(precisions)
    entry.update(binary_metrics(labels[ok], predicted, scores))
    entry.update(errors=int((~ok).sum()), escalated=float(escalated.mean()) if ok.any() else 0.0,
                 messages_per_second=None)
    section = cascade(labels[ok], k[ok], e[ok], threshold, band) if ok.any() else None
    return entry, section


def build_report(labeled: Labeled, runs: dict[str, Run], threshold: float, band, band_source: str,
                 choice: str) -> tuple[dict, dict | None]:
    """The report dict; with ``all`` also the cascade section (returned separately for the figure)."""
    spam = sum(labeled.y)
    report = {
        "input": str(labeled.path.resolve()),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": choice,
        "field": labeled.field,
        "label_field": labeled.label_field,
        "records": len(labeled.y),
        "labels": {"spam": spam, "ham": len(labeled.y) - spam},
        "threshold": threshold,
        "band": None if band is None else list(band),
        "band_source": band_source,
        "models": {name: model_entry(labeled.y, run, threshold) for name, run in runs.items()},
        "failed_records": failed_records(runs),
    }
    section = None
    if choice == "all":
        report["models"]["auto"], section = derived_auto(labeled.y, runs["koelectra"], runs["exaone"], band,
                                                         threshold)
        report["cascade"] = section
    return report, section


def evaluate(client, args, labeled: Labeled, threshold: float, band, band_source: str) -> dict:
    """Run the passes ``args.model`` asks for, write ``args.out`` (and ``args.plot``); the report."""
    from tqdm import tqdm

    names = ("koelectra", "exaone") if args.model == "all" else (args.model,)
    runs = {}
    for name in names:
        with tqdm(total=len(labeled.y), unit="msg", desc=name, disable=args.no_progress, file=sys.stderr) as bar:
            runs[name] = classify_all(client, labeled, name, args.chunk_size, args.window, bar.update)
    report, section = build_report(labeled, runs, threshold, band, band_source, args.model)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.plot is not None:
        from producer.plot import draw

        draw(args.plot, labeled.y, runs, section, threshold)
    return report
