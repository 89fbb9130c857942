"""How the confidence of the wrong-product operating point was chosen (docs/quality.md).

    .venv/bin/python scripts/compliance_confidence.py [--catalog out/demo/catalog-efficientnet_lite0.safetensors]

The demo catalogue (run `make demo` first) gains the empty-shelf entry; frames are composed from the
Grocery Store train photos that are not its references (catalog.shelf.calibration_photos), 80 per
calibration seed (the first 40 of them are the 40-frame calibration), and 40 frames from the val
photos (seed 4) are the held-out measurement. For each confidence (0 = the precision observed) and
each calibration seed, the operating point is chosen by catalog.compliance.calibrate_compliance and
measured on the val frames. Prints a table of wrong-product precision (recall, ok flagged) on val.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from catalog.compliance import calibrate_compliance, compliance_quality, facing_scores, statuses  # noqa: E402
from catalog.shelf import (  # noqa: E402
    DEFAULT_DATASET,
    LabelledFacings,
    calibration_photos,
    compose_frames,
    labelled_facings,
    val_photos,
    with_empty_entry,
)
from catalog.store import Catalog  # noqa: E402
from consumer.cli import _model_for  # noqa: E402

SEEDS = (1, 3, 5, 7)
CONFIDENCES = (0.0, 0.95, 0.99)


def first_frames(facings: LabelledFacings, frames: int) -> LabelledFacings:
    keep = facings.frame < frames
    return LabelledFacings(scores=facings.scores[keep], frame=facings.frame[keep],
                           expected=tuple(e for e, k in zip(facings.expected, keep, strict=True) if k),
                           truth=tuple(t for t, k in zip(facings.truth, keep, strict=True) if k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path,
                        default=ROOT / "out" / "demo" / "catalog-efficientnet_lite0.safetensors")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    args = parser.parse_args()
    catalog = Catalog.load(args.catalog)
    embedder = _model_for(catalog, "cpu")
    catalog = with_empty_entry(catalog, embedder, Path(tempfile.mkdtemp(prefix="empty-")))
    train = calibration_photos(args.dataset, catalog)
    held = labelled_facings(compose_frames(val_photos(args.dataset, catalog.skus), 40, seed=4), catalog, embedder)
    held_scores = facing_scores(held.scores, catalog.skus, held.expected)
    calibration = {seed: labelled_facings(compose_frames(train, 80, seed=seed), catalog, embedder) for seed in SEEDS}

    print("wrong-product precision % on 40 val frames (recall %, ok flagged %), calibrated on train-photo frames")
    print("| confidence | frames | " + " | ".join(f"seed {s}" for s in SEEDS) + " |")
    print("|---|---|" + "---|" * len(SEEDS))
    for confidence in CONFIDENCES:
        for frames in (40, 80):
            cells = []
            for seed in SEEDS:
                fit = first_frames(calibration[seed], frames)
                try:
                    point = calibrate_compliance(fit.scores, catalog.skus, fit.expected, fit.truth,
                                                 confidence=confidence)
                except ValueError:
                    cells.append("no point")
                    continue
                q = compliance_quality(statuses(held_scores, point), held.truth)
                cells.append(f"{100 * (q.wrong_precision or 0):.1f} ({100 * (q.wrong_recall or 0):.1f}, "
                             f"{100 * (q.ok_flagged or 0):.1f})")
            shown = "observed" if confidence == 0 else f"{confidence:.2f}"
            print(f"| {shown} | {frames} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
