"""``shelfmatch``: build and inspect catalogues, run the consumer, print the event schema."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from catalog.errors import CatalogError


def _catalog_build(args: argparse.Namespace) -> int:
    from catalog.build import build_catalog, references_from_folder, references_from_manifest

    if args.manifest:
        refs = references_from_manifest(Path(args.manifest), Path(args.images) if args.images else None)
    elif args.images:
        refs = references_from_folder(Path(args.images))
    else:
        raise CatalogError("give --images DIR (one folder per SKU) or --manifest CSV")
    catalog = build_catalog(
        refs, model=args.model, weights=args.weights, device=args.device, batch_size=args.batch_size,
    )
    catalog.save(args.out)
    print(f"wrote {args.out}")
    print(catalog.summary())
    return 0


def _catalog_info(args: argparse.Namespace) -> int:
    from catalog.store import Catalog

    print(Catalog.load(args.file).summary())
    return 0


def _schema(_: argparse.Namespace) -> int:
    from consumer.messages import MatchEvent

    print(json.dumps(MatchEvent.model_json_schema(), indent=2))
    return 0


def _consume(args: argparse.Namespace) -> int:
    from consumer.app import serve
    from consumer.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"shelfmatch consume: invalid settings\n{exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level)
    return asyncio.run(serve(settings))


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting: ``--batch-size`` for ``SHELFMATCH_BATCH_SIZE``; unset flags defer to the env."""
    from consumer.settings import Settings

    for name, field in Settings.model_fields.items():
        env = f"SHELFMATCH_{name.upper()}"
        help_text = f"{field.description or name.replace('_', ' ')} [{env}]"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, help=help_text)


def parser() -> argparse.ArgumentParser:
    from catalog.models import BACKBONES

    top = argparse.ArgumentParser(prog="shelfmatch", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    cat = sub.add_parser("catalog", help="build or inspect a catalogue file").add_subparsers(dest="action", required=True)
    build = cat.add_parser("build", help="embed reference images into a catalogue file")
    build.add_argument("--images", help="folder of references: DIR/<sku>/<image> (base folder for --manifest)")
    build.add_argument("--manifest", help="CSV with columns path,sku")
    build.add_argument("--model", required=True, choices=BACKBONES)
    build.add_argument("--weights", default="imagenet", help="imagenet | none | PATH to a checkpoint")
    build.add_argument("--out", required=True, help="catalogue file to write (.safetensors)")
    build.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    build.add_argument("--batch-size", type=int, default=32)
    build.set_defaults(func=_catalog_build)
    info = cat.add_parser("info", help="print a catalogue's summary")
    info.add_argument("file")
    info.set_defaults(func=_catalog_info)

    consume = sub.add_parser("consume", help="run the Kafka matching service (settings: flags or SHELFMATCH_*)")
    _add_settings_flags(consume)
    consume.set_defaults(func=_consume)

    schema = sub.add_parser("schema", help="print the JSON Schema of the MatchEvent")
    schema.set_defaults(func=_schema)
    return top


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except CatalogError as exc:
        print(f"shelfmatch: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
