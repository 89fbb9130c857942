"""Planogram compliance: is each facing the product the planogram expects, another one, or a gap?

Input: one similarity row per facing crop against the catalogue's products (what
:meth:`catalog.matcher.Matcher.scores` gives: cosine similarity to each product's best reference),
the SKU the planogram expects in that slot, and an operating point
(:class:`catalog.store.ComplianceCalibration`, stored with the catalogue).

The rule, per facing (``e`` the expected SKU, ``best`` the best real product's score, ``empty`` the
score of the reserved :data:`~catalog.planogram.EMPTY_SKU` entry when the catalogue has one):

1. ``empty`` when ``empty - best >= empty_margin``: the crop looks more like empty shelf than any
   product (a gap: out of stock);
2. ``ok`` when ``score(e) >= min_score`` and ``lead(e) >= min_lead``, where ``lead(e)`` is the
   expected product's score minus the best *other* product's: a verification ("is this the product
   that belongs here?"), easier than identifying the photo among all products, since the expected
   product may trail a look-alike by a little (``min_lead < 0``) and still be accepted;
3. ``unknown`` when ``best < unknown_below``: nothing in the catalogue looks like the crop (an
   occlusion, a product the catalogue lacks), so it cannot be called a wrong product;
4. ``wrong-product`` otherwise.

A facing whose expected SKU is not in the catalogue (it was removed since the planogram was
checked) is ``unknown``. Without a stored operating point, :data:`DEFAULT_COMPLIANCE` applies:
``ok`` when the expected product is the best one, ``empty`` when the empty entry is.

The frame's compliance score is ``ok / (facings - unknown)``: the share of the facings that could be
judged that hold the right product, so an occluded facing lowers neither side; it is ``None`` when no
facing could be judged. Share of shelf counts facings, not area: per SKU, the facings that show it
(the expected SKU for ``ok``, the best product for ``wrong-product``) over all facings showing a
product.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from catalog.planogram import EMPTY_SKU
from catalog.store import ComplianceCalibration

# The expected product being the best one; the empty entry being best means a gap.
DEFAULT_COMPLIANCE = ComplianceCalibration(min_lead=0.0, min_score=-1.0, empty_margin=0.0, unknown_below=-1.0)


class FacingStatus(StrEnum):
    OK = "ok"
    WRONG_PRODUCT = "wrong-product"
    EMPTY = "empty"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class FacingVerdict:
    """The judgement of one facing; the wire model (consumer/messages.py) is built from it."""

    slot_id: str
    expected: str
    status: FacingStatus
    candidates: tuple[tuple[str, float], ...]  # (sku, score), best first, top-k; may hold EMPTY_SKU
    expected_score: float | None  # None when the expected SKU is not in the catalogue
    margin: float | None  # expected's score minus the best other product's (EMPTY_SKU excluded)
    empty_score: float | None  # the EMPTY_SKU entry's score; None when the catalogue has none

    @property
    def seen(self) -> str | None:
        """The product this facing shows, as far as it is known (None for empty and unknown)."""
        if self.status is FacingStatus.OK:
            return self.expected
        if self.status is FacingStatus.WRONG_PRODUCT:
            return next((sku for sku, _ in self.candidates if sku not in (EMPTY_SKU, self.expected)), None)
        return None


@dataclass(frozen=True)
class FrameSummary:
    planogram_version: str
    facings: int
    counts: Mapping[str, int]  # every FacingStatus value -> facings with it
    compliance: float | None  # ok / (facings - unknown); None when every facing is unknown
    share_of_shelf: Mapping[str, float]  # SKU -> share of the facings that show a product


@dataclass(frozen=True)
class FacingScores:
    """The numbers the rule reads, per facing, as arrays (one entry per facing)."""

    expected_score: np.ndarray  # float; -inf where the expected SKU is not in the catalogue
    lead: np.ndarray  # expected's score minus the best other real product's
    best: np.ndarray  # the best real product's score
    empty_lead: np.ndarray  # EMPTY_SKU's score minus ``best``; -inf without an empty entry
    known: np.ndarray  # bool: the expected SKU is in the catalogue


def facing_scores(scores: np.ndarray, skus: Sequence[str], expected: Sequence[str]) -> FacingScores:
    """The rule's inputs from a (facings, products) score matrix in catalogue SKU order."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    index = {sku: i for i, sku in enumerate(skus)}
    real = scores.copy()
    empty_col = index.get(EMPTY_SKU)
    empty = np.full(n, -np.inf)
    if empty_col is not None:
        empty = scores[:, empty_col].copy()
        real[:, empty_col] = -np.inf
    cols = np.array([index.get(e, -1) for e in expected], dtype=np.int64)
    known = cols >= 0
    rows = np.arange(n)
    exp_score = np.where(known, real[rows, np.maximum(cols, 0)], -np.inf)
    others = real.copy()
    others[rows[known], cols[known]] = -np.inf
    best_other = others.max(axis=1) if real.shape[1] else np.full(n, -np.inf)
    best = real.max(axis=1) if real.shape[1] else np.full(n, -np.inf)
    lead = np.where(known, exp_score - best_other, -np.inf)
    return FacingScores(expected_score=exp_score, lead=lead, best=best, empty_lead=empty - best, known=known)


def statuses(fs: FacingScores, calibration: ComplianceCalibration) -> list[FacingStatus]:
    """The rule (see the module docstring) applied to every facing."""
    out = []
    for i in range(len(fs.best)):
        if fs.empty_lead[i] >= calibration.empty_margin:
            out.append(FacingStatus.EMPTY)
        elif not fs.known[i]:
            out.append(FacingStatus.UNKNOWN)
        elif fs.expected_score[i] >= calibration.min_score and fs.lead[i] >= calibration.min_lead:
            out.append(FacingStatus.OK)
        elif fs.best[i] < calibration.unknown_below:
            out.append(FacingStatus.UNKNOWN)
        else:
            out.append(FacingStatus.WRONG_PRODUCT)
    return out


def judge(
    scores: np.ndarray | torch.Tensor,
    skus: Sequence[str],
    expected: Sequence[str],
    slot_ids: Sequence[str],
    *,
    calibration: ComplianceCalibration | None = None,
    top_k: int = 5,
) -> list[FacingVerdict]:
    """One verdict per facing: ``scores`` (facings, products) in catalogue SKU order, e.g.
    ``Matcher.scores(vectors)``; ``expected`` and ``slot_ids`` per facing (the planogram's slots)."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    if not (len(scores) == len(expected) == len(slot_ids)):
        raise ValueError(f"{len(scores)} score rows for {len(expected)} expected SKUs and {len(slot_ids)} slots")
    cal = calibration or DEFAULT_COMPLIANCE
    fs = facing_scores(scores, skus, expected)
    k = max(1, min(top_k, len(skus)))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k] if len(scores) else np.zeros((0, k), dtype=np.int64)
    has_empty = EMPTY_SKU in skus
    verdicts = []
    for i, status in enumerate(statuses(fs, cal)):
        verdicts.append(FacingVerdict(
            slot_id=slot_ids[i],
            expected=expected[i],
            status=status,
            candidates=tuple((skus[j], round(float(scores[i, j]), 6)) for j in top[i]),
            expected_score=round(float(fs.expected_score[i]), 6) if fs.known[i] else None,
            margin=round(float(fs.lead[i]), 6) if fs.known[i] and np.isfinite(fs.lead[i]) else None,
            empty_score=round(float(fs.empty_lead[i] + fs.best[i]), 6) if has_empty else None,
        ))
    return verdicts


def summarise(verdicts: Sequence[FacingVerdict], planogram_version: str) -> FrameSummary:
    """Counts per status, the compliance score and share of shelf of one frame's verdicts."""
    counts = Counter(v.status for v in verdicts)
    judged = len(verdicts) - counts[FacingStatus.UNKNOWN]
    seen = Counter(s for v in verdicts if (s := v.seen) is not None)
    total = sum(seen.values())
    return FrameSummary(
        planogram_version=planogram_version,
        facings=len(verdicts),
        counts={s.value: counts[s] for s in FacingStatus},
        compliance=round(counts[FacingStatus.OK] / judged, 6) if judged else None,
        share_of_shelf={sku: round(n / total, 6) for sku, n in sorted(seen.items())},
    )
