"""``shelfmatch``: build and inspect catalogues, run the consumer, print the event schema."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from catalog.errors import CatalogError
from consumer.errors import ConfigurationError

log = logging.getLogger("shelfmatch")

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np

    from catalog.build import Reference
    from catalog.embedder import Embedder
    from catalog.store import Catalog
    from catalog.update import Change
    from consumer.settings import Settings

# Embeddings of evaluation images are reused between runs while files and model are unchanged.
CACHE = Path(".cache") / "features"
# Views per reference photo for training the head. 0: extra views gained too little to be worth
# their embedding time by default (docs/quality-experiments.md).
AUGMENT_VIEWS = 0
DEVICE_HELP = "where the network runs: auto (a GPU when present) | cpu | cuda"


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        message = f"{text!r} is not a size in pixels or a comma-separated list of them"
        raise argparse.ArgumentTypeError(message) from None
    return sizes


def _catalog_build(args: argparse.Namespace) -> int:
    from catalog.build import build_catalog

    refs = _labelled(args.images, args.manifest, "images", manifest_flag="manifest")
    catalog = build_catalog(
        refs, model=args.model, weights=args.weights, device=args.device, batch_size=args.batch_size, cache=CACHE,
        scales=tuple(args.input_size or ()),  # one size is an input size (catalog.models.load_backbone)
    )
    catalog.save(args.out)
    print(f"wrote {args.out}")
    print(catalog.summary())
    return 0


def _report_change(change: Change, out: str, took_s: float) -> None:
    catalog = change.catalog
    parts = []
    if change.rows_added or change.skipped:
        parts.append(f"{change.rows_added} references added ({len(change.skus_added)} new SKUs)")
        if change.skipped:
            parts.append(f"{change.skipped} already there, skipped")
    if change.rows_removed:
        parts.append(f"{change.rows_removed} references removed ({len(change.skus_removed)} SKUs gone)")
    print(f"wrote {out} in {took_s:.1f}s: {', '.join(parts) or 'no change'}")
    print(catalog.summary())


def _catalog_add(args: argparse.Namespace) -> int:
    import time

    from catalog.store import Catalog
    from catalog.update import add_references, model_of

    started = time.perf_counter()
    catalog = Catalog.load(args.catalog)
    refs = _labelled(args.images, args.manifest, "images", manifest_flag="manifest")
    change = add_references(catalog, refs, embedder=model_of(catalog, args.device, args.weights),
                            batch_size=args.batch_size)
    out = args.out or args.catalog
    change.catalog.save(out)
    _report_change(change, out, time.perf_counter() - started)
    return 0


def _catalog_remove(args: argparse.Namespace) -> int:
    import time

    from catalog.store import Catalog
    from catalog.update import remove

    started = time.perf_counter()
    if not (args.sku or args.reference):
        raise CatalogError("give --sku SKU or --reference PATH (each repeatable)")
    change = remove(Catalog.load(args.catalog), skus=args.sku or [], references=args.reference or [])
    out = args.out or args.catalog
    change.catalog.save(out)
    _report_change(change, out, time.perf_counter() - started)
    return 0


def _labelled(
    folder: str | None, manifest: str | None, what: str, manifest_flag: str | None = None,
) -> list[Reference]:
    """Labelled photos from ``--WHAT DIR`` (DIR/<sku>/<image>) or a CSV manifest (path,sku; relative
    paths from DIR when given, else from the CSV's folder)."""
    from catalog.build import references_from_folder, references_from_manifest

    if manifest:
        return references_from_manifest(Path(manifest), Path(folder) if folder else None)
    if folder:
        return references_from_folder(Path(folder))
    raise CatalogError(f"give --{what} DIR (one folder per SKU) or --{manifest_flag or what + '-manifest'} CSV")


def _model_for(catalog: Catalog, device: str) -> Embedder:
    from catalog.embedder import Embedder
    from catalog.models import backbone_of

    return Embedder(backbone_of(catalog.fingerprint, catalog.weights_source, catalog.head()), device)


def _truth(catalog_skus: Sequence[str], refs: Sequence[Reference]) -> np.ndarray:
    import numpy as np

    index = {s: i for i, s in enumerate(catalog_skus)}
    unknown = sorted({r.sku for r in refs} - set(index))
    if unknown:
        raise CatalogError(f"{len(unknown)} labelled products are not in the catalogue, e.g. {unknown[:3]}")
    return np.array([index[r.sku] for r in refs])


def _catalog_train_head(args: argparse.Namespace) -> int:
    from catalog.augment import Augmentation
    from catalog.build import Reference, catalog_from_vectors, embed_images
    from catalog.embedder import Embedder
    from catalog.head import project, train_head, with_views
    from catalog.models import backbone_of
    from catalog.store import Catalog

    catalog = Catalog.load(args.catalog)
    refs = [Reference(Path(p), catalog.skus[i]) for p, i in zip(catalog.references, catalog.row_sku, strict=True)]
    missing = [r.path for r in refs if not r.path.is_file()]
    if missing:
        raise CatalogError(f"{len(missing)} reference images of the catalogue are missing, e.g. {missing[0]}")
    backbone = backbone_of(catalog.fingerprint, catalog.weights_source)  # without its head, if any
    embedder = Embedder(backbone, args.device)
    paths = [r.path for r in refs]
    features = embed_images(paths, embedder, cache=CACHE, desc="backbone features")
    # Views only train the head; the catalogue keeps one row per reference photo.
    views = [embed_images(paths, embedder, cache=CACHE, desc=f"view {seed + 1}/{args.augment}",
                          augmentation=Augmentation(seed=seed)) for seed in range(args.augment)]
    head = train_head(*with_views(features, catalog.row_sku, views), out_dim=args.dim, epochs=args.epochs,
                      scale=args.scale, weight_decay=args.weight_decay)
    trained = catalog_from_vectors(refs, project(head, features), backbone.with_head(head), catalog.weights_source)
    trained.save(args.out)
    cleared = (" (its calibration no longer applies: calibrate this one again)"
               if catalog.calibration or catalog.compliance else "")
    print(f"wrote {args.out}{cleared}")
    print(trained.summary())
    return 0


def _catalog_calibrate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from catalog.build import embed_images
    from catalog.evaluate import calibrate, product_scores
    from catalog.store import Calibration, Catalog

    catalog = Catalog.load(args.catalog)
    refs = _labelled(args.queries, args.queries_manifest, "queries")
    vectors = embed_images([r.path for r in refs], _model_for(catalog, args.device), cache=CACHE,
                           desc="embedding queries")
    scores = product_scores(vectors, catalog.embeddings, catalog.row_sku, len(catalog.skus))
    point = calibrate(scores, _truth(catalog.skus, refs), target_precision=args.target_precision)
    out = args.out or args.catalog
    replace(catalog, calibration=Calibration(threshold=round(point.threshold, 6), min_margin=point.min_margin)).save(
        out
    )
    where = f"written to {out}" if args.out else f"written into {out} in place (--out FILE writes a copy instead)"
    print(
        f"threshold {point.threshold:.4f}, min margin {point.min_margin:.3f}: precision "
        f"{100 * point.precision:.1f}%, recall {100 * point.recall:.1f}% on {len(refs)} photos; {where}"
    )
    return 0


def _shelf_photos(args: argparse.Namespace, catalog: Catalog, *, calibration: bool) -> dict[str, list[Path]]:
    """The photos frames are composed from: --photos DIR/<sku>/<image>; else, to calibrate, the
    dataset's train photos that are not the catalogue's references, and to evaluate, its val photos
    (so that the evaluation's photos are never the calibration's)."""
    from catalog.build import references_from_folder
    from catalog.shelf import calibration_photos, val_photos

    if not args.photos:
        if calibration:
            return calibration_photos(Path(args.dataset), catalog)
        return val_photos(Path(args.dataset), catalog.skus)
    photos: dict[str, list[Path]] = {}
    for ref in references_from_folder(Path(args.photos)):
        if ref.sku in catalog.skus:
            photos.setdefault(ref.sku, []).append(ref.path)
    return photos


def _catalog_calibrate_compliance(args: argparse.Namespace) -> int:
    from catalog.shelf import calibrate_on_frames
    from catalog.store import Catalog

    catalog = Catalog.load(args.catalog)
    out = Path(args.out or args.catalog)
    calibrated, labelled = calibrate_on_frames(
        catalog, _model_for(catalog, args.device), _shelf_photos(args, catalog, calibration=True), frames=args.frames,
        seed=args.seed, target_precision=args.target_precision, empty_folder=out.parent / f"{out.stem}.empty",
        empty_references=args.empty_references, confidence=args.confidence,
    )
    calibrated.save(out)
    c = calibrated.compliance
    assert c is not None
    print(f"min lead {c.min_lead:.4f}, min score {c.min_score:.4f}, empty margin {c.empty_margin:.4f} on "
          f"{len(labelled.truth)} facings of {args.frames} composed frames; written to {out}")
    return 0


def _eval_compliance(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from catalog.compliance import format_quality
    from catalog.render import render_compliance
    from catalog.shelf import evaluate_on_frames, evaluation_sample, judge_frame
    from catalog.store import Catalog

    if not args.catalog or len(args.catalog) != 1:
        raise CatalogError("--compliance evaluates one catalogue: give --catalog FILE once")
    catalog = Catalog.load(args.catalog[0])
    embedder = _model_for(catalog, args.device)
    photos = _shelf_photos(args, catalog, calibration=False)
    result = evaluate_on_frames(catalog, embedder, photos, frames=args.frames,
                                target_precision=args.target_precision or 0.95)
    print(f"{result.frames} composed frames from {args.photos or 'the val photos'}, {result.facings} facings")
    stored = "the catalogue's operating point" if catalog.compliance else "no stored operating point: the default rule"
    print(format_quality(stored, result.stored))
    print(format_quality("default rule (expected product best, empty entry best)", result.default_rule))
    for i, fold in enumerate(result.cross_validated):
        name = f"2-fold by photo, fold {i} (calibrated on the other half's frames)"
        if fold is None:
            print(f"{name}: no operating point reaches the target on the other half's frames (too few "
                  "wrong-product facings for the confidence: give more --frames)")
        else:
            print(format_quality(name, fold))
    for i, (precision, recall) in enumerate(result.empty_by_threshold):
        shown = "n/a" if precision is None or recall is None else f"{100 * precision:.1f}% / {100 * recall:.1f}%"
        print(f"empty by a threshold on the best product's score alone (no empty entry), fold {i}: "
              f"precision / recall {shown}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"catalog_version": catalog.version, "compliance": asdict(catalog.compliance) if catalog.compliance
                  else None, **asdict(result)}
        (out / "compliance.json").write_text(json.dumps(report, indent=2) + "\n")
        frame = evaluation_sample(photos)
        verdicts = judge_frame(frame.image, frame.planogram, catalog, embedder)
        render_compliance(frame.image, frame.planogram, verdicts).save(out / "compliance-frame.png")
        print(f"wrote {out / 'compliance.json'} and {out / 'compliance-frame.png'} (one evaluation frame)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.compliance:
        return _eval_compliance(args)

    from catalog.baselines import baseline_vectors
    from catalog.build import build_catalog, embed_images
    from catalog.evaluate import (
        RESEARCH_THRESHOLDS,
        cross_validated_calibration,
        format_table,
        operating_point,
        plot,
        product_scores,
        quality,
    )
    from catalog.store import Catalog

    queries = _labelled(args.queries, args.queries_manifest, "queries")
    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else RESEARCH_THRESHOLDS
    catalogs: dict[str, Catalog] = {}
    if args.catalog:
        for path in args.catalog:
            c = Catalog.load(path)
            catalogs[f"{Path(path).stem} ({c.fingerprint.describe()})"] = c
    if args.references or args.references_manifest:
        refs = _labelled(args.references, args.references_manifest, "references")
        for model in filter(None, (args.models or "").split(",")):
            catalogs[f"{model} ({args.weights})"] = build_catalog(
                refs, model=model, weights=args.weights, device=args.device, cache=CACHE
            )
    if not catalogs:
        raise CatalogError("give --catalog FILE, or --references/--references-manifest with --models")
    results: dict[str, tuple[np.ndarray, np.ndarray, Any]] = {}
    report: dict[str, Any] = {"queries": len(queries), "thresholds": list(thresholds), "methods": []}
    for name, catalog in catalogs.items():
        vectors = embed_images(
            [r.path for r in queries], _model_for(catalog, args.device), cache=CACHE, desc=f"queries: {name}"
        )
        results[name] = (
            product_scores(vectors, catalog.embeddings, catalog.row_sku, len(catalog.skus)),
            _truth(catalog.skus, queries),
            catalog,
        )
    methods = [m for m in (args.methods or "").split(",") if m]
    if methods:
        base = next(iter(catalogs.values()))
        base_refs = [Path(p) for p in base.references]
        query_paths = [r.path for r in queries]
        for method in methods:
            ref_vecs = baseline_vectors(method, base_refs)
            results[method] = (
                product_scores(baseline_vectors(method, query_paths), ref_vecs, base.row_sku, len(base.skus)),
                _truth(base.skus, queries),
                base,
            )
    for name, (scores, truth, catalog) in results.items():
        q = quality(name, scores, truth, thresholds)
        print(format_table(q))
        entry = {**q.to_dict(), "catalog_version": catalog.version}
        if catalog.calibration is not None and name in catalogs:
            cal = catalog.calibration
            point = operating_point(scores, truth, cal.threshold, cal.min_margin)
            entry["stored_calibration"] = vars(point)
            print(
                f"  at the catalogue's calibration (threshold {cal.threshold:.4f}, min margin {cal.min_margin:.3f}): "
                f"precision {100 * point.precision:.1f}%, recall {100 * point.recall:.1f}%"
            )
        if args.target_precision and name in catalogs:
            try:
                entry["cross_validated"] = cross_validated_calibration(
                    scores, truth, target_precision=args.target_precision
                )
            except ValueError as exc:
                entry["cross_validated"] = str(exc)
        report["methods"].append(entry)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report["plots"] = plot({n: (s, t) for n, (s, t, _) in results.items()}, out)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=float, allow_nan=False) + "\n")
        print(f"wrote {out / 'report.json'} and {len(report['plots'])} plots")
    return 0


def _catalog_info(args: argparse.Namespace) -> int:
    from catalog.store import Catalog

    print(Catalog.load(args.file).summary())
    return 0


SCHEMAS = ("match-event", "compliance-event", "planogram")


def _schema(args: argparse.Namespace) -> int:
    from catalog.planogram import planogram_schema
    from consumer.messages import ComplianceEvent, MatchEvent

    schemas = {"match-event": MatchEvent.model_json_schema, "compliance-event": ComplianceEvent.model_json_schema,
               "planogram": planogram_schema}
    print(json.dumps(schemas[args.which](), indent=2))
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    """The settings from SHELFMATCH_* variables and the command's flags (a flag wins); warns about
    variables that name no setting. An invalid value is a ConfigurationError naming the variable."""
    from consumer.settings import Settings, explain, unknown_variables

    for name in unknown_variables(os.environ):
        log.warning("%s is not a shelfmatch setting and is ignored (misspelt? `shelfmatch consume --help` lists them)",
                    name)
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(f"invalid settings: {explain(exc)}") from exc


def _consume(args: argparse.Namespace) -> int:
    from consumer.app import serve
    from consumer.logs import quiet_library_logs

    settings = _settings(args)
    logging.getLogger().setLevel(settings.log_level)
    quiet_library_logs()
    return asyncio.run(serve(settings))


def _topics_create(args: argparse.Namespace) -> int:
    from consumer.admin import create_topics

    settings = _settings(args)
    for line in asyncio.run(create_topics(settings, partitions=args.partitions,
                                          replication_factor=args.replication_factor,
                                          retention_ms=args.retention_ms)):
        print(line)
    return 0


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting: ``--batch-size`` for ``SHELFMATCH_BATCH_SIZE``; unset flags defer to the env."""
    from consumer.settings import Settings

    for name, field in Settings.model_fields.items():
        env = f"SHELFMATCH_{name.upper()}"
        help_text = f"{field.description or name.replace('_', ' ')} [{env}]"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, help=help_text)


def _confidence(text: str) -> float:
    """A --confidence: 0 (the precision observed), or at least 0.5 and below 1."""
    value = float(text)
    if value != 0 and not 0.5 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give 0 (the precision observed) or a value in [0.5, 1)")
    return value


def _default_dataset() -> Path:
    from catalog.shelf import DEFAULT_DATASET

    return DEFAULT_DATASET


def parser() -> argparse.ArgumentParser:
    from catalog.models import BACKBONES

    top = argparse.ArgumentParser(prog="shelfmatch", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    cat = sub.add_parser("catalog", help="build or inspect a catalogue file").add_subparsers(
        dest="action", required=True
    )
    build = cat.add_parser("build", help="embed reference images into a catalogue file")
    build.add_argument("--images", help="folder of references: DIR/<sku>/<image> (base folder for --manifest)")
    build.add_argument("--manifest", help="CSV with columns path,sku")
    build.add_argument("--model", required=True, choices=BACKBONES, help="backbone network that embeds the photos")
    build.add_argument("--weights", default="imagenet", help="imagenet | none | PATH to a checkpoint")
    build.add_argument(
        "--input-size",
        type=_sizes,
        metavar="PIXELS[,PIXELS...]",
        help="square input size instead of the backbone's own (224 for ResNets); costs about "
        "(PIXELS/224)^2 more compute per photo, in the catalogue and in the consumer. Several sizes "
        "(e.g. 224,320,384) run the network at each and join the features: the cost is their sum",
    )
    build.add_argument("--out", required=True, help="catalogue file to write (.safetensors)")
    build.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help=DEVICE_HELP)
    build.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    build.set_defaults(func=_catalog_build)
    head = cat.add_parser("train-head", help="train a projection head on the catalogue's reference photos")
    head.add_argument("--catalog", required=True, help="catalogue file whose reference photos train the head")
    head.add_argument("--out", required=True, help="catalogue file to write, with the head (a new fingerprint)")
    head.add_argument("--dim", type=int, default=256, help="output dimension of the head")
    head.add_argument("--epochs", type=int, default=30, help="passes over the references (default 30)")
    head.add_argument("--scale", type=float, default=8.0, help="inverse temperature of the proxy loss")
    head.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default 0.01)")
    head.add_argument(
        "--augment",
        type=int,
        default=AUGMENT_VIEWS,
        metavar="N",
        help="random views (crop, flip, colour) of each reference added to the head's training "
        "photos; they train the head only, the catalogue keeps the references (0: none)",
    )
    head.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help=DEVICE_HELP)
    head.set_defaults(func=_catalog_train_head)
    cal = cat.add_parser("calibrate", help="choose threshold and min margin for a target precision on labelled photos")
    cal.add_argument("--catalog", required=True, help="catalogue file to calibrate")
    cal.add_argument("--queries", help="labelled photos: DIR/<sku>/<image> (base folder for --queries-manifest)")
    cal.add_argument("--queries-manifest", help="CSV with columns path,sku")
    cal.add_argument("--target-precision", type=float, default=0.95,
                     help="least share of right 'match' verdicts on the photos (default 0.95)")
    cal.add_argument("--out", help="catalogue file to write (default: update --catalog in place)")
    cal.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help=DEVICE_HELP)
    cal.set_defaults(func=_catalog_calibrate)
    cc = cat.add_parser("calibrate-compliance", help="choose the planogram verification's operating point "
                        "(wrong-product, empty) on shelf frames composed from train photos that are not references")
    cc.add_argument("--catalog", required=True, help="catalogue file to calibrate (gains the __empty__ entry "
                    "if it lacks one, from generated empty bays written beside --out)")
    cc.add_argument("--dataset", default=str(_default_dataset()), help="the Grocery Store Dataset folder")
    cc.add_argument("--photos", help="compose from DIR/<sku>/<image> instead of the dataset's train photos that "
                    "are not among the catalogue's references")
    cc.add_argument("--frames", type=int, default=40, help="composed frames, 24 facings each (default 40)")
    cc.add_argument("--empty-references", type=int, default=60, metavar="N",
                    help="generated empty-bay crops for the __empty__ entry, when it is added (default 60)")
    cc.add_argument("--seed", type=int, default=1, help="seed of the composed frames (eval uses 2)")
    cc.add_argument("--target-precision", type=float, default=0.95,
                    help="least share of right 'wrong-product' calls (default 0.95)")
    # The default is catalog.compliance.CALIBRATION_CONFIDENCE (tested; not imported: --help stays free of torch).
    cc.add_argument("--confidence", type=_confidence, default=0.99,
                    help="confidence with which the precision must reach the target on these frames (its "
                    "one-sided lower bound; default %(default)s, needs ~30 frames; 0: the precision observed)")
    cc.add_argument("--out", help="catalogue file to write (default: update --catalog in place)")
    cc.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help=DEVICE_HELP)
    cc.set_defaults(func=_catalog_calibrate_compliance)
    add = cat.add_parser("add", help="add references (new SKUs or more images) to a catalogue: only they are "
                         "embedded, with the catalogue's own model")
    add.add_argument("--catalog", required=True, help="catalogue file to add references to")
    add.add_argument("--images", help="new references: DIR/<sku>/<image> (base folder for --manifest)")
    add.add_argument("--manifest", help="CSV with columns path,sku")
    add.add_argument("--out", help="catalogue file to write (default: replace --catalog, atomically; a running "
                     "service swaps it in)")
    add.add_argument("--weights", help="weights source if not the catalogue's (imagenet | none | PATH); must "
                     "reproduce its fingerprint")
    add.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help=DEVICE_HELP)
    add.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    add.set_defaults(func=_catalog_add)
    rm = cat.add_parser("remove", help="remove SKUs or single references from a catalogue (nothing is embedded)")
    rm.add_argument("--catalog", required=True, help="catalogue file to remove products or references from")
    rm.add_argument("--sku", action="append", help="a SKU to remove with all its references (repeatable)")
    rm.add_argument("--reference", action="append", metavar="PATH",
                    help="one reference image to remove, its path as the catalogue records it (repeatable)")
    rm.add_argument("--out", help="catalogue file to write (default: replace --catalog, atomically)")
    rm.set_defaults(func=_catalog_remove)
    info = cat.add_parser("info", help="print a catalogue's summary")
    info.add_argument("file")
    info.set_defaults(func=_catalog_info)

    consume = sub.add_parser("consume", help="run the Kafka matching service (settings: flags or SHELFMATCH_*)")
    _add_settings_flags(consume)
    consume.set_defaults(func=_consume)

    ev = sub.add_parser("eval", help="matching quality on labelled photos (the research's Table 3 and more)")
    ev.add_argument("--queries", help="labelled photos: DIR/<sku>/<image> (base folder for --queries-manifest)")
    ev.add_argument("--queries-manifest", help="CSV with columns path,sku")
    ev.add_argument("--catalog", action="append", help="a catalogue file to evaluate as built (repeatable)")
    ev.add_argument("--references", help="reference photos DIR/<sku>/<image>, to build a catalogue per --models")
    ev.add_argument("--references-manifest", help="CSV with columns path,sku")
    ev.add_argument("--models", help=f"comma-separated backbones among {', '.join(BACKBONES)}")
    ev.add_argument("--weights", default="imagenet", help="for --models: imagenet | none | PATH to a checkpoint")
    ev.add_argument("--methods", help="also the research's baselines: histogram,phash")
    ev.add_argument("--thresholds", help="comma-separated (default 0.85,0.90,0.95,0.99)")
    ev.add_argument("--target-precision", type=float, help="also report a 2-fold cross-validated operating point")
    ev.add_argument("--out", help="folder for report.json and PNG plots (compliance.json with --compliance)")
    ev.add_argument("--compliance", action="store_true",
                    help="planogram compliance on shelf frames composed from the val photos (one --catalog)")
    ev.add_argument("--dataset", default=str(_default_dataset()), help="for --compliance: the Grocery Store folder")
    ev.add_argument("--frames", type=int, default=80, help="for --compliance: composed frames, half from each half "
                    "of the photos (default 80: each half holds enough wrong-product facings to calibrate on)")
    ev.add_argument("--photos", help="for --compliance: compose from DIR/<sku>/<image>, not the val split")
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help=DEVICE_HELP)
    ev.set_defaults(func=_eval)

    topics = sub.add_parser("topics", help="create the input, output and dead-letter topics").add_subparsers(
        dest="action", required=True
    )
    create = topics.add_parser(
        "create", help="create the topics named by the settings (SHELFMATCH_INPUT_TOPIC, ..._OUTPUT_TOPIC, "
        "..._DLQ_TOPIC) on SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS; existing ones are left as they are",
    )
    create.add_argument("--partitions", type=int, default=3,
                        help="partitions of the input topic: the most consumers that share the work (default 3)")
    create.add_argument("--replication-factor", type=int, default=1,
                        help="replicas per partition (default 1, a development broker; use 3 in production)")
    create.add_argument("--retention-ms", type=int, default=7 * 24 * 3600 * 1000,
                        help="how long the input and dead-letter topics keep records (default 7 days)")
    _add_settings_flags(create)
    create.set_defaults(func=_topics_create)

    schema = sub.add_parser("schema", help="print the JSON Schema of an event or of a planogram record")
    schema.add_argument("which", nargs="?", choices=SCHEMAS, default="match-event",
                        help="match-event (a photo matched whole; the default), compliance-event (a photo with "
                        "regions) or planogram (a record of SHELFMATCH_PLANOGRAMS or SHELFMATCH_PLANOGRAM_TOPIC)")
    schema.set_defaults(func=_schema)
    return top


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (CatalogError, ConfigurationError, OSError) as exc:
        # A wrong setting, file or address: one line that says what to do, exit 2. The traceback
        # only with SHELFMATCH_LOG_LEVEL=DEBUG.
        if os.environ.get("SHELFMATCH_LOG_LEVEL", "").upper() == "DEBUG":
            log.exception("traceback")
        print(f"shelfmatch: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"no such file: {exc.filename}"
    if isinstance(exc, OSError) and not isinstance(exc, (CatalogError, ConfigurationError)):
        return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
