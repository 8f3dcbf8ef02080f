"""The ``moe-dist-data`` command: build, check and inspect webdataset image-text shards.

    moe-dist-data shard INPUT --out DIR [--per-shard N] [--max-shard-bytes B] [--resize PX]
                        [--format keep|jpg|webp] [--workers W] [--val-fraction F]
                        [--max-caption-chars N] [--allow-outside-paths] [--overwrite] ...
A SPEC is a brace pattern, a .tar, a shard directory, or the --out DIR of ``shard``/``synth`` (its train
split; DIR/val names the val split), several joined by "::".

    moe-dist-data validate SPEC            exit 1 if any sample is broken or a shard differs from its manifest
    moe-dist-data stats SPEC [--json]
    moe-dist-data tokenizer SPEC --out tok.model [--vocab-size V]
    moe-dist-data synth --out DIR [--n N] [--seed S]
    moe-dist-data recipe emoji --out DIR [--from PATH] [--size 64] [--val-fraction F] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from moe_dist.config import finite_float

from . import DEFAULT_MAX_CAPTION_CHARS

SPEC_HELP = ("brace pattern, .tar, shard directory, or the --out DIR of shard/synth (its train split; DIR/val for "
             "the val split); 'a::b' for several")


def _shard(args) -> int:
    from .shard import ShardOptions, shard

    opts = ShardOptions(per_shard=args.per_shard, max_shard_bytes=args.max_shard_bytes, resize=args.resize,
                        format=args.format, quality=args.quality, workers=args.workers,
                        val_fraction=args.val_fraction, seed=args.seed, max_caption_chars=args.max_caption_chars)
    manifest = shard(args.input, args.out, opts, args.kind, args.image_column, args.caption_column, args.images,
                     progress=not args.quiet, allow_outside=args.allow_outside_paths, allow_pipe=args.allow_pipe,
                     overwrite=args.overwrite)
    _report(manifest, args.out)
    return 0


def _report(manifest, out) -> None:
    reasons = {}
    for f in manifest["failed"]:
        reasons[f["reason"]] = reasons.get(f["reason"], 0) + 1
    print(f"{manifest['inputs']} inputs: {manifest['written']} written, {manifest['failed_count']} failed"
          + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})" if reasons else ""))
    for name, split in manifest["splits"].items():
        print(f"  {name}: {split['samples']} samples in {split['shards']} shards -> {os.path.join(out, name)}")
    print(f"manifest: {os.path.join(out, 'manifest.json')}")
    if "train" in manifest["splits"]:
        print(f"spec: {out} (its train split; name another split by its directory, e.g. {os.path.join(out, 'val')})")


def _synth(args) -> int:
    from .publish import write_json
    from .shard import ShardOptions, shard_items
    from .synth import CLASSES, TEMPLATES, synth_items

    opts = ShardOptions(per_shard=args.per_shard, workers=args.workers, val_fraction=args.val_fraction,
                        seed=args.seed)
    if args.vqa:
        return _synth_vqa(args, opts)
    manifest = shard_items(synth_items(args.n, args.seed, args.size), args.out, opts, source=f"synth(seed={args.seed})",
                           total=args.n, progress=not args.quiet, overwrite=args.overwrite)
    write_json(args.out, "classes.json", {"classes": CLASSES, "templates": TEMPLATES})
    _report(manifest, args.out)
    return 0


def _synth_vqa(args, opts) -> int:
    """DIR: the questions about scenes whose main object is not held out (train, and val by --val-fraction);
    DIR/heldout: those about held-out colour-shape combinations (a dataset of its own, so a spec)."""
    from .shard import ShardOptions, shard_items
    from .synth import vqa_items

    for heldout, out, options in ((False, args.out, opts),
                                  (True, os.path.join(args.out, "heldout"),
                                   ShardOptions(per_shard=args.per_shard, workers=args.workers, seed=args.seed))):
        manifest = shard_items(vqa_items(args.n, args.seed, args.size, heldout=heldout), out, options,
                               source=f"synth-vqa(seed={args.seed}, heldout={heldout})", progress=not args.quiet,
                               overwrite=args.overwrite)
        _report(manifest, out)
    return 0


def _recipe(args) -> int:
    import time

    from .recipes import build_recipe
    from .shard import ShardOptions

    start = time.perf_counter()
    opts = ShardOptions(per_shard=args.per_shard, workers=args.workers, val_fraction=args.val_fraction,
                        seed=args.seed)
    manifest, data = build_recipe(args.name, args.out, args.from_path, opts, args.size, progress=not args.quiet,
                                  overwrite=args.overwrite)
    _report(manifest, args.out)
    print(f"{len(data.classes)} classes ({', '.join(f'{c}: {n}' for c, n in data.counts.items())}) -> "
          f"{os.path.join(args.out, 'classes.json')}")
    print(f"built in {time.perf_counter() - start:.1f} s from {data.source}")
    return 0


def _validate(args) -> int:
    from .scan import validate

    result = validate(args.spec, progress=not args.quiet, allow_pipe=args.allow_pipe)
    for b in result["broken"]:
        print(f"BROKEN {b['shard']} key={b['key']} reason={b['reason']}")
    print(f"{result['samples']} samples, {result['ok']} ok, {len(result['broken'])} broken")
    return 1 if result["broken"] else 0


def _stats(args) -> int:
    from .scan import stats

    result = stats(args.spec, progress=not args.quiet, allow_pipe=args.allow_pipe)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['shards']} shards, {result['samples']} samples, {result['bytes']:,} bytes"
          + (f", {result['unreadable']} unreadable" if result["unreadable"] else "")
          + (f", {result['missing']} missing (listed in a manifest, not in its shard)" if result["missing"] else ""))
    for title, key in (("image longest side", "image_longest_side"), ("caption words", "caption_words"),
                       ("key sets", "key_sets")):
        print(f"{title}:")
        for bucket, count in sorted(result[key].items()):
            print(f"  {bucket:>16s} {count:8d}")
    return 0


def _tokenizer(args) -> int:
    from moe_dist.text import SentencePieceTokenizer, train_sentencepiece

    from .scan import captions

    model = train_sentencepiece(captions(args.spec, progress=not args.quiet, allow_pipe=args.allow_pipe),
                                args.vocab_size, args.model_type, args.max_sentences, args.seed)
    from moe_dist.files import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, model)  # a failed write leaves the previous model whole
    tok = SentencePieceTokenizer(args.out)
    print(f"wrote {args.out}: {args.model_type} model, {tok.vocab_size} pieces (pad=0 unk=1 bos=2 eos=3)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-dist-data", description="Build, validate and inspect webdataset "
                                     "image-text shards for moe-dist.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("shard", help="turn a CSV/TSV/JSONL, COCO captions, image folder, img2dataset output "
                                     "or existing shards into shards + manifest.json")
    p.add_argument("input", help="CSV/TSV/JSONL file, COCO .json, folder of images with .txt captions, or shard spec")
    p.add_argument("--out", required=True, help="output directory (train/, val/, manifest.json), or "
                   "s3://BUCKET/PREFIX: shards uploaded as they complete, manifests last; a re-run skips the "
                   "shards already uploaded")
    p.add_argument("--kind", choices=["table", "coco", "folder", "shards"], help="input kind (default: detected)")
    p.add_argument("--image-column", default="image", help="table column with image paths (default: image)")
    p.add_argument("--caption-column", default="caption", help="table column with captions (default: caption)")
    p.add_argument("--images", help="image folder of a COCO captions file (default: next to the .json)")
    p.add_argument("--per-shard", type=int, default=10000, help="samples per shard (default: 10000)")
    p.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="payload bytes per shard (default: 1 GiB)")
    p.add_argument("--resize", type=int, default=0, metavar="PX", help="shrink so the longest side is <= PX")
    p.add_argument("--format", default="keep", choices=["keep", "jpg", "webp"], help="re-encode images")
    p.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality when re-encoding (default: 90)")
    p.add_argument("--workers", type=int, default=1, help="parallel decode/re-encode processes")
    p.add_argument("--val-fraction", type=finite_float, default=0.0, help="fraction of samples for val/ (by key hash)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--max-caption-chars", type=int, default=DEFAULT_MAX_CAPTION_CHARS, metavar="N",
                   help=f"longer captions are failed inputs (default: {DEFAULT_MAX_CAPTION_CHARS})")
    p.add_argument("--allow-outside-paths", action="store_true", help="read image paths that leave the input's "
                   "directory ('..', absolute, symlinks out); by default they are failed inputs")
    p.set_defaults(func=_shard)

    p = sub.add_parser("validate", help="decode every sample; exit 1 if any is broken")
    p.add_argument("spec", help=SPEC_HELP)
    p.set_defaults(func=_validate)

    p = sub.add_parser("stats", help="counts, bytes, image-size and caption-length histograms, key sets")
    p.add_argument("spec", help=SPEC_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_stats)

    p = sub.add_parser("tokenizer", help="train a sentencepiece model on the captions of a shard spec")
    p.add_argument("spec", help=SPEC_HELP)
    p.add_argument("--out", required=True, help="output .model file")
    p.add_argument("--vocab-size", type=int, default=8000, help="at most this many pieces (default: 8000)")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    p.add_argument("--max-sentences", type=int, default=0, help="subsample this many captions (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsampling")
    p.set_defaults(func=_tokenizer)

    p = sub.add_parser("synth", help="procedural shapes dataset with compositional captions and class labels")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=2000, help="number of samples (default: 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--per-shard", type=int, default=250, help="samples per shard (default: 250)")
    p.add_argument("--val-fraction", type=finite_float, default=0.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--vqa", action="store_true",
                   help="one VQA sample per question about each scene (text 'question: Q answer: A', json question/"
                        "answer/question_type); scenes whose main object is a held-out colour-shape combination go "
                        "to DIR/heldout (a spec of its own), the rest to DIR (train, and val by --val-fraction)")
    p.set_defaults(func=_synth)

    from .recipes import RECIPES

    p = sub.add_parser("recipe", help="a real dataset from a package anyone can fetch (emoji: ~1,900 emoji "
                                      "images with their names, 10 categories as zero-shot classes)")
    p.add_argument("name", choices=sorted(RECIPES), help="which recipe")
    p.add_argument("--out", required=True, help="output directory (train/, val/, manifest.json, classes.json)")
    p.add_argument("--from", dest="from_path", metavar="PATH", help="the package: its unpacked directory or .tgz "
                   "(default: npm pack the pinned version)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64, the package's own)")
    p.add_argument("--val-fraction", type=finite_float, default=0.1, help="fraction of samples for val/, by key hash "
                   "(default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--per-shard", type=int, default=500, help="samples per shard (default: 500)")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=_recipe)

    for name in ("shard", "synth", "recipe"):
        sub.choices[name].add_argument("--overwrite", action="store_true", help="replace the dataset (shards and "
                                       "manifests) already in --out; by default such an --out is refused")
    for name in ("shard", "validate", "stats", "tokenizer"):
        sub.choices[name].add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs in the spec "
                                       "(they run shell commands); other URL schemes are always refused")
    for p in sub.choices.values():
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        print(f"moe-dist-data {args.command}: error: {err}", file=sys.stderr)
        return 2


def command() -> None:
    """The ``moe-dist-data`` console command and ``python -m data_tools.cli``."""
    from moe_dist import exit_process

    exit_process(main())


if __name__ == "__main__":
    command()
