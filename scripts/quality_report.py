"""Regenerate docs/quality.md from `shelfmatch eval` runs on the Grocery Store Dataset.

    .venv/bin/python scripts/quality_report.py [--dataset ../shared/datasets/grocery-store]

Catalogue references come from the dataset's train split and packshots; queries are its val
split (the test split is held out and never read). Each step is a real `shelfmatch` command:

1. packshots only, EfficientNet-Lite0, plus the research's baselines (RGB histogram, pHash);
2. packshots + train photos as references;
3. step 2 + a projection head trained on the references (`shelfmatch catalog train-head`), and the
   same head trained on the references plus random views of them (`--augment 4`);
4. calibration of each head for 95% precision on val (`shelfmatch catalog calibrate`), with a
   2-fold cross-validated estimate of the operating point (chosen on one half, measured on the other),
   and the issue #6 targets checked against those honest numbers.

ResNet weights come from torchvision's download servers; where they are reachable, add
`--models resnet18,resnet50,resnet152` to compare them in the same run.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from catalog.grocery import grocery_sets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/ is not an installed package
from bench.report import merged  # noqa: E402

# Views per reference the report measures against the default (`--augment`, cached after the first run).
REPORT_VIEWS = 4
# The joined input sizes measured best for their compute (docs/quality-experiments.md, *Joined sizes*).
JOINED = "224,384"
OUT = ROOT / "out" / "quality"
DOCS = ROOT / "docs"

# The research's own best rows (ResNet-152 features, 1000 photos from two retail chains).
RESEARCH = [("ResNet-152, threshold 0.90", 53.6, 9.9), ("ResNet-152, threshold 0.95", 42.7, 4.7)]


def manifests(dataset: Path) -> dict[str, Path]:
    """CSV manifests (path,sku) for packshots, packshots+train, and val."""
    OUT.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, rows in grocery_sets(dataset).items():
        paths[key] = OUT / f"{key}.csv"
        with open(paths[key], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "sku"])
            w.writerows((str(p), sku) for p, sku in rows)
    return paths


def shelfmatch(*args: str) -> None:
    print("$ shelfmatch " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "consumer.cli", *args], check=True, cwd=ROOT)


def pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def table3(entries: list[dict]) -> list[str]:
    thresholds = [row["threshold"] for row in entries[0]["table"]]
    head = "| method | top-1 % | top-5 % | " + " | ".join(f"recall / FP per TP % at {t:.2f}" for t in thresholds) + " |"
    lines = [head, "|" + "---|" * (3 + len(thresholds))]
    for e in entries:
        cells = [f"{pct(r['recall'])} / {pct(r['fp_per_tp'])}" for r in e["table"]]
        lines.append(f"| {e['method']} | {pct(e['top1'])} | {pct(e['top5'])} | " + " | ".join(cells) + " |")
    return lines


def issue_targets(entry: dict, folds: list[dict]) -> list[tuple[str, str, bool]]:
    """Issue #6: top-1 >= 85% on val; at the calibrated point, precision >= 95% with recall >= 70%,
    both taken from the cross-validated folds (each fold must meet them)."""
    rows = [("top-1 >= 85%", f"{pct(entry['top1'])}%", entry["top1"] >= 0.85)]
    if folds:
        p = " / ".join(pct(f["precision"]) for f in folds)
        r = " / ".join(pct(f["recall"]) for f in folds)
        rows.append(("precision >= 95% (each CV fold)", f"{p}%", all(f["precision"] >= 0.95 for f in folds)))
        rows.append(
            ("recall >= 70% at that precision (each CV fold)", f"{r}%", all(f["recall"] >= 0.70 for f in folds))
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "grocery-store"))
    parser.add_argument("--models", default="efficientnet_lite0")
    args = parser.parse_args()
    dataset = Path(args.dataset)
    m = manifests(dataset)
    val = ["--queries-manifest", str(m["val"])]

    shelfmatch(
        "eval",
        "--references-manifest",
        str(m["packshots"]),
        "--models",
        args.models,
        "--methods",
        "histogram,phash",
        *val,
        "--out",
        str(OUT / "1-packshots"),
    )
    base = OUT / "train.safetensors"
    shelfmatch(
        "catalog", "build", "--manifest", str(m["packshots+train"]), "--model", "efficientnet_lite0", "--out", str(base)
    )
    shelfmatch(
        "eval",
        "--references-manifest",
        str(m["packshots+train"]),
        "--models",
        args.models,
        *val,
        "--out",
        str(OUT / "2-train"),
    )
    head, views_head = OUT / "train-head.safetensors", OUT / f"train-head-{REPORT_VIEWS}-views.safetensors"
    shelfmatch("catalog", "train-head", "--catalog", str(base), "--out", str(head))
    shelfmatch(
        "catalog", "train-head", "--catalog", str(base), "--augment", str(REPORT_VIEWS), "--out", str(views_head)
    )
    for c in (head, views_head):
        shelfmatch("catalog", "calibrate", "--catalog", str(c), *val, "--target-precision", "0.95")
    shelfmatch(
        "eval",
        "--catalog",
        str(base),
        "--catalog",
        str(head),
        "--catalog",
        str(views_head),
        *val,
        "--target-precision",
        "0.95",
        "--out",
        str(OUT / "3-head"),
    )

    # Issue #17: the same recipe at joined input sizes (catalog build --input-size 224,384).
    joined, joined_head = OUT / f"train-{JOINED.replace(',', '+')}.safetensors", OUT / "train-joined-head.safetensors"
    shelfmatch("catalog", "build", "--manifest", str(m["packshots+train"]), "--model", "efficientnet_lite0",
               "--input-size", JOINED, "--out", str(joined))
    shelfmatch("catalog", "train-head", "--catalog", str(joined), "--out", str(joined_head))
    shelfmatch("catalog", "calibrate", "--catalog", str(joined_head), *val, "--target-precision", "0.95")
    shelfmatch("eval", "--catalog", str(joined_head), *val, "--target-precision", "0.95",
               "--out", str(OUT / "4-joined"))

    reports = {k: json.loads((OUT / k / "report.json").read_text())
               for k in ("1-packshots", "2-train", "3-head", "4-joined")}
    DOCS.mkdir(exist_ok=True)
    (DOCS / "quality").mkdir(exist_ok=True)
    for k in reports:
        for png in (OUT / k).glob("*.png"):
            shutil.copy(png, DOCS / "quality" / f"{k}-{png.name}")
    by_stem = {e["method"].split(" ")[0]: e for e in reports["3-head"]["methods"]}
    head_entry = by_stem["train-head"]
    stored = head_entry.get("stored_calibration", {})
    folds = [f for f in head_entry.get("cross_validated", []) if isinstance(f, dict)]
    targets = issue_targets(head_entry, folds)
    joined_entry = reports["4-joined"]["methods"][0]

    def network_entry(report: str) -> dict:  # the network's row, not the histogram's or pHash's
        return next(e for e in reports[report]["methods"] if e["method"].startswith("efficientnet"))

    joined_folds = [f for f in joined_entry.get("cross_validated", []) if isinstance(f, dict)]
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()

    lines = [
        "# Matching quality",
        "",
        "Generated by `scripts/quality_report.py` from `shelfmatch eval` runs "
        f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"commit {commit}, {platform.machine()} CPU), into this file: sections written from other commands "
        "(named in them) stay as they were. Do not edit the generated ones by hand.",
        "",
        "Data: the Grocery Store Dataset (Klasson et al., WACV 2019; MIT license): 81 products photographed in "
        "Swedish stores. References are the catalogue packshots and the 2,640 *train* photos; every number below "
        f"is measured on the {reports['2-train']['queries']} *val* photos, "
        "which are never used as references or to train. "
        "The test split is held out and never read. Only EfficientNet-Lite0 has ImageNet weights that install "
        "offline here; ResNet rows need torchvision's download (add `--models resnet18,resnet50,resnet152`).",
        "",
        "## 1. The research's Table 3 layout, catalogue = packshots only",
        "",
        "Recall: share of photos whose true product scores at or above the threshold. FP per TP: wrong products "
        "at or above the threshold, divided by true products found (n/a when none is found).",
        "",
        *table3(reports["1-packshots"]["methods"]),
        "",
        "The research's best rows, for comparison (different photos, ResNet-152):",
        "",
        "| research | recall % | FP per TP % |",
        "|---|---|---|",
        *[f"| {n} | {r} | {f} |" for n, r, f in RESEARCH],
        "",
        "![threshold curves](quality/1-packshots-threshold-curves.png)",
        "![score distributions](quality/1-packshots-score-distributions.png)",
        "",
        "## 2. Store photos as extra references",
        "",
        *table3(reports["2-train"]["methods"]),
        "",
        "## 3. Projection head trained on the references (`shelfmatch catalog train-head`)",
        "",
        "A linear map on frozen EfficientNet-Lite0 features, trained with a normalised-softmax proxy loss on "
        "the reference photos (seconds on a CPU), stored in the catalogue and part of its fingerprint. "
        "`train-head` is the default, trained on the reference photos alone; "
        f"`train-head-{REPORT_VIEWS}-views` also on {REPORT_VIEWS} random views of each (`--augment {REPORT_VIEWS}`: "
        "random-resized crop keeping 35-100% of the area, horizontal flip, brightness/contrast/saturation/hue "
        "jitter; `catalog/augment.py`). Views train the head only: the catalogue still holds one vector per "
        "reference photo, and photos are embedded at serving time exactly as before. One training seed per row: "
        "over 3 seeds the views moved val top-1 by +0.4 points on average (see the experiments page), so a "
        "difference of 1-2 points between these two rows is noise (one val photo is 0.34 points).",
        "",
        *table3(reports["3-head"]["methods"]),
        "",
        "Cross-validated operating point of each (2 folds of val, target precision 95%; see section 4):",
        "",
        "| method | fold 0 precision / recall % | fold 1 precision / recall % |",
        "|---|---|---|",
        *[
            f"| {stem} | "
            + " | ".join(
                f"{pct(f['precision'])} / {pct(f['recall'])}" for f in e["cross_validated"] if isinstance(f, dict)
            )
            + " |"
            for stem, e in by_stem.items()
            if isinstance(e.get("cross_validated"), list)
        ],
        "",
        "How the head's settings were chosen, and the variants that did not help: "
        "[quality-experiments.md](quality-experiments.md).",
        "",
        "![threshold curves](quality/3-head-threshold-curves.png)",
        "![score distributions](quality/3-head-score-distributions.png)",
        "",
        "## 4. Operating point (calibrated for 95% precision)",
        "",
        f"Stored in the catalogue by `shelfmatch catalog calibrate` (chosen on all val photos): threshold "
        f"{stored.get('threshold', float('nan')):.4f}, min margin {stored.get('min_margin', float('nan')):.3f}; "
        f"on those same photos precision {pct(stored.get('precision'))}%, recall {pct(stored.get('recall'))}%.",
        "",
        "Honest estimate (2-fold cross-validation: chosen on one half of val, measured on the other):",
        "",
        "| fold | chosen on | measured on | threshold | min margin | precision % | recall % |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {f['fold']} | {f['chosen_on']} | {f['measured_on']} | {f['threshold']:.4f} | {f['min_margin']:.3f} | "
            f"{pct(f['precision'])} | {pct(f['recall'])} |"
            for f in folds
            if isinstance(f, dict)
        ],
        "",
        "The consumer uses the stored operating point unless `SHELFMATCH_THRESHOLD` / `SHELFMATCH_MIN_MARGIN` are set.",
        "",
        "## 5. Issue #6 targets (default head, honest numbers)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in targets],
        "",
        "## 6. Joined input sizes (issue #17)",
        "",
        f"`catalog build --input-size {JOINED}`: the network runs at each of these sizes and the vectors are "
        "joined before the head "
        "(see the README, *Weights*). The recipe is otherwise the default's: packshots and train photos "
        "as references, `train-head` with its defaults, `calibrate` on val for 95% precision.",
        "",
        *table3(reports["4-joined"]["methods"]),
        "",
        "| fold | chosen on | measured on | threshold | min margin | precision % | recall % |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {f['fold']} | {f['chosen_on']} | {f['measured_on']} | {f['threshold']:.4f} | {f['min_margin']:.3f} | "
            f"{pct(f['precision'])} | {pct(f['recall'])} |"
            for f in joined_folds
        ],
        "",
        "The cost of each lever, one head seed each (the mean of 3 seeds and the compute are measured in "
        "`scripts/experiments/joined_scales.py`, [quality-experiments.md](quality-experiments.md), *Joined sizes*):",
        "",
        "| lever | top-1 % | compute per photo | through the service on 2 cores |",
        "|---|---|---|---|",
        f"| packshots only as references, no head | {pct(network_entry('1-packshots')['top1'])} | 1x | |",
        f"| + train photos as references | {pct(network_entry('2-train')['top1'])} | 1x | |",
        f"| + head (the default) | {pct(head_entry['top1'])} | 1x | the default |",
        f"| + joined sizes {JOINED} | {pct(joined_entry['top1'])} | 4.2x | fp32: 1.26x the eager service of "
        "before the CPU runtime, 0.19x today's default (bench/e2e.py) |",
        "",
        "Issue #17 targets (joined sizes, honest numbers):",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {name} | {value} | {'yes' if ok else '**no**'} |"
          for name, value, ok in issue_targets(joined_entry, joined_folds)],
        "",
    ]
    # Sections written from other commands (planogram compliance) stay as they were.
    (DOCS / "quality.md").write_text("\n".join(merged(lines, DOCS / "quality.md")))
    print(f"wrote {DOCS / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
