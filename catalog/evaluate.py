"""Matching quality on labelled photos: the research's Table 3, top-k accuracy, operating points.

The research (ResNet features, cosine similarity, one threshold) reported per threshold:

- recall: the share of query photos whose true product scores at or above the threshold;
- false positives per true positive: wrong products at or above the threshold, over all
  queries, divided by the number of true products found.

Several products may pass the threshold for one photo, so both can be high at low thresholds.
The service itself publishes one verdict per photo; :func:`operating_point` measures that
(precision and recall of ``match`` verdicts) for a threshold and minimum margin.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

RESEARCH_THRESHOLDS = (0.85, 0.90, 0.95, 0.99)


@dataclass(frozen=True)
class ThresholdRow:
    threshold: float
    recall: float  # share of queries whose true product passes the threshold
    fp_per_tp: float | None  # wrong products passing / true products passing; None when none is found


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    min_margin: float
    precision: float  # correct 'match' verdicts / all 'match' verdicts
    recall: float  # correct 'match' verdicts / all queries
    matches: int


@dataclass(frozen=True)
class Quality:
    method: str
    queries: int
    products: int
    top1: float
    top5: float
    table: tuple[ThresholdRow, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def threshold_table(
    scores: np.ndarray, truth: np.ndarray, thresholds: Iterable[float] = RESEARCH_THRESHOLDS
) -> tuple[ThresholdRow, ...]:
    """``scores``: (queries, products) similarities; ``truth``: (queries,) true product index."""
    rows = []
    true_scores = scores[np.arange(len(truth)), truth]
    for t in thresholds:
        passing = scores >= t
        tp = int((true_scores >= t).sum())
        fp = int(passing.sum()) - tp
        rows.append(ThresholdRow(threshold=float(t), recall=tp / len(truth), fp_per_tp=fp / tp if tp else None))
    return tuple(rows)


def top_k_accuracy(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((top == truth[:, None]).any(axis=1).mean())


def quality(
    method: str, scores: np.ndarray, truth: np.ndarray, thresholds: Iterable[float] = RESEARCH_THRESHOLDS
) -> Quality:
    return Quality(
        method=method,
        queries=len(truth),
        products=scores.shape[1],
        top1=top_k_accuracy(scores, truth, 1),
        top5=top_k_accuracy(scores, truth, 5),
        table=threshold_table(scores, truth, thresholds),
    )


def best_two(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index of the best product, its score, and its lead over the runner-up, per query."""
    order = np.argsort(-scores, axis=1)[:, :2]
    best = order[:, 0]
    top = scores[np.arange(len(scores)), best]
    second = scores[np.arange(len(scores)), order[:, 1]] if scores.shape[1] > 1 else np.full(len(scores), -np.inf)
    return best, top, top - second


def operating_point(scores: np.ndarray, truth: np.ndarray, threshold: float, min_margin: float) -> OperatingPoint:
    best, top, margin = best_two(scores)
    matched = (top >= threshold) & (margin >= min_margin)
    correct = matched & (best == truth)
    n = int(matched.sum())
    return OperatingPoint(
        threshold=float(threshold),
        min_margin=float(min_margin),
        precision=float(correct.sum() / n) if n else 1.0,
        recall=float(correct.sum() / len(truth)),
        matches=n,
    )


def calibrate(
    scores: np.ndarray,
    truth: np.ndarray,
    *,
    target_precision: float,
    margins: Sequence[float] = (0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1),
) -> OperatingPoint:
    """The (threshold, min margin) with the highest recall whose precision reaches the target.

    Thresholds are tried at every observed best score, so the choice is exact for the data
    given; among equal recalls the higher threshold wins (fewer surprises on new photos).
    Raises ValueError if no point reaches the target.
    """
    best, top, margin = best_two(scores)
    right = best == truth
    chosen: OperatingPoint | None = None
    for m in margins:
        ok = margin >= m
        # Sort candidates by score, descending: accepting all with score >= t is a prefix.
        order = np.argsort(-top[ok], kind="stable")
        tops, rights = top[ok][order], right[ok][order]
        correct = np.cumsum(rights)
        accepted = np.arange(1, len(tops) + 1)
        precision = correct / accepted
        for i in range(len(tops) - 1, -1, -1):
            if i + 1 < len(tops) and tops[i + 1] == tops[i]:
                continue  # a threshold accepts every tie at once
            if precision[i] >= target_precision:
                point = OperatingPoint(
                    threshold=float(tops[i]),
                    min_margin=float(m),
                    precision=float(precision[i]),
                    recall=float(correct[i] / len(truth)),
                    matches=int(accepted[i]),
                )
                if chosen is None or (point.recall, point.threshold) > (chosen.recall, chosen.threshold):
                    chosen = point
                break
    if chosen is None:
        raise ValueError(f"no threshold reaches precision {target_precision:.2f} on these photos")
    return chosen


# --- running an evaluation -------------------------------------------------------------------


def product_scores(queries: np.ndarray, refs: np.ndarray, row_sku: np.ndarray, products: int) -> np.ndarray:
    """(queries, products): each product scores as its best reference (as the Matcher does)."""
    rows = queries.astype(np.float32) @ refs.astype(np.float32).T
    out = np.full((len(queries), products), -np.inf, dtype=np.float32)
    np.maximum.at(out.T, row_sku, rows.T)
    return out


def cross_validated_calibration(
    scores: np.ndarray,
    truth: np.ndarray,
    *,
    target_precision: float,
    folds: int = 2,
    seed: int = 0,
) -> list[dict]:
    """Calibrate on all folds but one, measure on the one left out: an honest operating point."""
    order = np.random.default_rng(seed).permutation(len(truth))
    results = []
    for k in range(folds):
        held = order[k::folds]
        fit = np.setdiff1d(order, held)
        point = calibrate(scores[fit], truth[fit], target_precision=target_precision)
        measured = operating_point(scores[held], truth[held], point.threshold, point.min_margin)
        results.append({"fold": k, "chosen_on": len(fit), "measured_on": len(held), **asdict(measured)})
    return results


def plot(results: dict[str, tuple[np.ndarray, np.ndarray]], out_dir: Path) -> list[str]:
    """PNG plots: recall and false positives per true positive against the threshold; score
    distributions of true and wrong products. ``results``: method -> (scores, truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = np.round(np.arange(0.30, 1.0001, 0.01), 2)
    fig, (ax_r, ax_f) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (scores, truth) in results.items():
        table = threshold_table(scores, truth, thresholds)
        ax_r.plot(thresholds, [100 * r.recall for r in table], label=name)
        ax_f.plot(thresholds, [100 * r.fp_per_tp if r.fp_per_tp is not None else float("nan") for r in table],
                  label=name)
    ax_r.set(xlabel="similarity threshold", ylabel="recall %", title="true product found")
    ax_f.set(
        xlabel="similarity threshold",
        ylabel="false positives per true positive %",
        title="wrong products passing",
        yscale="log",
    )
    ax_r.legend(fontsize=7)
    fig.tight_layout()
    files = [str(out_dir / "threshold-curves.png")]
    fig.savefig(files[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), squeeze=False)
    for ax, (name, (scores, truth)) in zip(axes[0], results.items(), strict=True):
        true = scores[np.arange(len(truth)), truth]
        wrong = scores.copy()
        wrong[np.arange(len(truth)), truth] = -np.inf
        ax.hist(true, bins=40, alpha=0.6, label="true product", density=True)
        ax.hist(wrong.max(axis=1), bins=40, alpha=0.6, label="best wrong product", density=True)
        ax.set(title=name, xlabel="similarity")
        ax.title.set_fontsize(8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    files.append(str(out_dir / "score-distributions.png"))
    fig.savefig(files[1], dpi=110)
    plt.close(fig)
    return files


def format_table(q: Quality) -> str:
    lines = [
        f"{q.method}: {q.queries} photos, {q.products} products, top-1 {100 * q.top1:.1f}%, top-5 {100 * q.top5:.1f}%",
        "  threshold   recall %   false positives per true positive %",
    ]
    for r in q.table:
        fp = f"{100 * r.fp_per_tp:8.1f}" if r.fp_per_tp is not None else "     n/a"
        lines.append(f"  {r.threshold:9.2f}   {100 * r.recall:8.1f}   {fp}")
    return "\n".join(lines)
