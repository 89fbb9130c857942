"""Photo vectors -> top-k products, scores and a verdict, in one normalised matrix product.

S = X · Yᵀ compares every photo of a batch with every reference row at once (both sides are unit
vectors, so S holds cosine similarities). A product with several reference images scores as its
best reference: the row scores are reduced per product with ``scatter_reduce(amax)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from catalog.planogram import EMPTY_SKU
from catalog.store import Catalog


class Verdict(StrEnum):
    MATCH = "match"  # best >= threshold and best - second >= min_margin
    AMBIGUOUS = "ambiguous"  # best >= threshold but another product is too close
    UNKNOWN = "unknown"  # best < threshold


def verdict(best: float, second: float | None, threshold: float, min_margin: float) -> Verdict:
    """The verdict rule, kept apart from the maths so that it can be read and tested alone."""
    if best < threshold:
        return Verdict.UNKNOWN
    if second is not None and best - second < min_margin:
        return Verdict.AMBIGUOUS
    return Verdict.MATCH


def device_bytes(rows: int, dim: int, device: torch.device, batch_size: int = 0) -> int:
    """Bytes a :class:`Matcher` of ``rows`` x ``dim`` reference vectors holds on ``device``: the
    matrix (fp16 on CUDA, fp32 elsewhere) and the row-to-SKU index (int64); with ``batch_size``, also
    what matching one batch allocates (row scores in the matrix dtype and in fp32, then per product).

    For 1M references that is 1M x dim x 2 bytes on a GPU: 2.6 GB at 1280 (EfficientNet-Lite0),
    4.1 GB at 2048 (ResNet-50); a swap holds two of them for a moment."""
    element = 2 if device.type == "cuda" else 4
    return rows * dim * element + rows * 8 + batch_size * rows * (element + 4 + 4)


@dataclass(frozen=True)
class Match:
    candidates: tuple[tuple[str, float], ...]  # (sku, score), best first; top_k of them
    verdict: Verdict
    margin: float  # best score minus the runner-up's, even when top_k is 1 (0 with one product)

    @property
    def best(self) -> tuple[str, float]:
        return self.candidates[0]


class Matcher:
    """Holds the catalogue matrix on a device and matches batches of unit vectors against it."""

    def __init__(
        self, catalog: Catalog, *, device: torch.device, top_k: int = 5,
        threshold: float = 0.9, min_margin: float = 0.0,
    ) -> None:
        self.skus = catalog.skus
        # The reserved empty-shelf entry serves facing verdicts (scores()) only: a whole photo is
        # never "matched" to an empty shelf, and the entry is never anyone's runner-up.
        self._empty = catalog.skus.index(EMPTY_SKU) if EMPTY_SKU in catalog.skus else None
        self._ranked = len(catalog.skus) - (self._empty is not None)
        self.top_k = max(1, min(top_k, self._ranked))
        self.threshold = threshold
        self.min_margin = min_margin
        self.device = device
        # fp16 halves memory and doubles matmul speed on a GPU; CPUs stay in fp32.
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self._refs = torch.from_numpy(catalog.embeddings).to(device, self.dtype)
        self._row_sku = torch.from_numpy(catalog.row_sku.astype("int64")).to(device)
        self._products = len(catalog.skus)
        self._one_row_per_sku = len(catalog.row_sku) == self._products and bool(
            (self._row_sku == torch.arange(self._products, device=device)).all()
        )

    @property
    def device_bytes(self) -> int:
        """Bytes the reference matrix and its index hold on the device."""
        return self._refs.numel() * self._refs.element_size() + self._row_sku.numel() * 8

    @torch.inference_mode()
    def scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, products) cosine similarity of each photo to each product's best reference."""
        rows = vectors.to(self.device, self.dtype) @ self._refs.T  # (B, R)
        rows = rows.float()
        if self._one_row_per_sku:
            return rows
        out = torch.full((rows.shape[0], self._products), -2.0, device=rows.device)
        index = self._row_sku.unsqueeze(0).expand_as(rows)
        return out.scatter_reduce_(1, index, rows, reduce="amax", include_self=True)

    @torch.inference_mode()
    def match(self, vectors: torch.Tensor) -> list[Match]:
        """Top-k candidates and a verdict for each row of ``vectors``."""
        if vectors.shape[0] == 0:
            return []
        k = min(max(self.top_k, 2), self._ranked)  # the margin needs the runner-up
        scores = self.scores(vectors)
        if self._empty is not None:
            scores[:, self._empty] = float("-inf")
        top = torch.topk(scores, k, dim=1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        results = []
        for vals, idxs in zip(values, indices, strict=True):
            second = vals[1] if len(vals) > 1 else None
            v = verdict(vals[0], second, self.threshold, self.min_margin)
            cands = tuple(
                (self.skus[i], round(float(s), 6)) for i, s in zip(idxs[: self.top_k], vals[: self.top_k], strict=True)
            )
            margin = round(float(vals[0] - second), 6) if second is not None else 0.0
            results.append(Match(candidates=cands, verdict=v, margin=margin))
        return results
