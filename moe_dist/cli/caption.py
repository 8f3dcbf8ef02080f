"""``moe-dist caption``: captions for a folder of images or a shard spec, from a CoCa checkpoint, as JSONL.

Images of any size are resized and centre-cropped to the model's input (open_clip's eval transform), after
``moe_dist.data.decode.to_rgb`` (EXIF orientation; transparency composited onto white; 16-bit, CMYK, palette and
1-bit images to RGB). A file that cannot be read is reported on stderr ("caption: failed NAME: REASON") and
written as ``{"key": NAME, "error": REASON}`` in its place; the others are captioned and a last stderr line says
"captioned N, failed M". Exit 0 if anything was captioned, 2 if every file failed.
Decoding: greedy (default), beam search (--beam-width, --length-penalty) or top-p sampling.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator, List, Tuple

from ..config import finite_float

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def add_generation_flags(p: argparse.ArgumentParser, max_length: int) -> None:
    """The decoding flags ``caption`` and ``vqa`` share."""
    p.add_argument("--strategy", default="greedy", choices=["greedy", "beam", "top_p"],
                   help="greedy (default), beam search, or top-p (nucleus) sampling")
    p.add_argument("--max-length", type=int, default=max_length,
                   help=f"most tokens generated after the prompt, EOS included (default {max_length})")
    p.add_argument("--beam-width", type=int, default=4, help="beams per image with --strategy beam (default 4)")
    p.add_argument("--length-penalty", type=finite_float, default=1.0,
                   help="beam: rank finished beams by logprob / length ** this (default 1.0; 0: no normalisation)")
    p.add_argument("--top-p", type=finite_float, default=0.9, help="top_p: probability mass sampled from (default 0.9)")
    p.add_argument("--temperature", type=finite_float, default=1.0, help="top_p: logits divided by this (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="top_p: sampling seed (default 0)")
    p.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")


def generation_config(args: argparse.Namespace):
    from ..generation import GenerationConfig

    if args.batch < 1:
        raise ValueError(f"--batch {args.batch} must be >= 1")
    return GenerationConfig(strategy=args.strategy, max_new=args.max_length, beam_width=args.beam_width,
                            length_penalty=args.length_penalty, top_p=args.top_p, temperature=args.temperature,
                            seed=args.seed)


def load_model(checkpoint: str):
    """(model, tokenizer) of a CoCa checkpoint or export on this process's device; one-line errors otherwise."""
    from deepspeed.accelerator import get_accelerator

    from ..generation import check_generative
    from ..models import load_pretrained

    model, tokenizer = load_pretrained(checkpoint, ep_size=1)
    check_generative(model, checkpoint)
    accelerator = get_accelerator()
    device = "cpu" if accelerator.device_name() == "cpu" else accelerator.device_name()
    return model.to(device).eval(), tokenizer


def image_files(directory: str) -> List[str]:
    files = sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise ValueError(f"--images {directory} holds no image files ({', '.join(IMAGE_EXTS)}); give a folder of "
                         "images or a shard spec")
    return files


# Past this aspect ratio an image is first cut to its central part (the short side plus a margin each way, so
# the resize filter sees the same neighbourhood): a 1 x 100000 strip would otherwise be resized to
# S x (S * 100000) pixels before the centre crop throws almost all of it away.
MAX_ASPECT = 4
FAILED_FIELD = "error"


def _bounded_aspect(img):
    width, height = img.size
    short, long = min(width, height), max(width, height)
    if long <= MAX_ASPECT * short:
        return img
    keep = min(long, short * 3 + 8)  # the short side plus a margin of short + 4 either side
    start = (long - keep) // 2
    box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
    return img.crop(box)


def load_image(path: str, transform):
    """One image file as the model's input tensor [3, S, S]; raises ValueError(reason) if it is unreadable."""
    from PIL import Image

    from ..data.decode import to_rgb

    try:
        with Image.open(path) as img:
            return transform(_bounded_aspect(to_rgb(img)))
    except Exception as err:  # PIL raises many types for corrupt, truncated or odd files; all mean "bad file"
        raise ValueError(f"{type(err).__name__}: {err}".strip()) from None


def folder_batches(directory: str, size: int,
                   batch: int) -> Iterator[Tuple[List[str], "object", List[Tuple[str, str]]]]:
    """(names read, images [B, 3, S, S] or None, [(name, reason) of files that failed]) per ``batch`` files of a
    folder, in name order, any size or mode. A bad file never stops the run: it is reported, the rest go on."""
    import torch

    from ..data.evalset import default_eval_transform

    transform = default_eval_transform(size)
    files = image_files(directory)
    for start in range(0, len(files), batch):
        names, images, failed = [], [], []
        for name in files[start:start + batch]:
            try:
                images.append(load_image(os.path.join(directory, name), transform))
                names.append(name)
            except ValueError as err:
                failed.append((name, str(err)))
        yield names, (torch.stack(images) if images else None), failed


def caption_folder(model, tokenizer, directory: str, cfg, batch: int) -> Tuple[List[dict], int, int]:
    """(JSONL rows in file-name order, captioned, failed); one stderr line per file that could not be read."""
    from ..generation import generate

    device = next(model.parameters()).device
    lines, captioned, failures = [], 0, 0
    for names, images, failed in folder_batches(directory, model.cfg.vision.image_size, batch):
        rows = {}
        for name, reason in failed:
            print(f"caption: failed {name}: {reason}", file=sys.stderr)
            rows[name] = {"key": name, FAILED_FIELD: reason}
        if images is not None:
            for name, text in zip(names, generate(model, tokenizer, images.to(device), None, cfg)):
                rows[name] = {"key": name, "caption": text}
        lines.extend(rows[name] for name in sorted(rows))
        captioned += len(names)
        failures += len(failed)
    if not captioned:
        raise ValueError(f"--images {directory}: none of its {failures} image files could be read (reasons above)")
    return lines, captioned, failures


def _run(args: argparse.Namespace) -> int:
    import json

    from ..evaluation.captioning import generate_over
    from ..files import atomic_write

    cfg = generation_config(args)
    model, tokenizer = load_model(args.checkpoint)
    lines, summary = [], None
    if os.path.isdir(args.images) and not os.path.exists(os.path.join(args.images, "manifest.json")) \
            and any(f.lower().endswith(IMAGE_EXTS) for f in os.listdir(args.images)):
        lines, captioned, failed = caption_folder(model, tokenizer, args.images, cfg, args.batch)
        summary = f"captioned {captioned}, failed {failed}"
    else:
        for row in generate_over(model, tokenizer, args.images, "caption", cfg, args.batch,
                                 progress=sys.stderr.isatty()):
            lines.append({"key": f"{row['key'][0]}:{row['key'][1]}", "image_id": row["image_id"],
                          "caption": row["generated"], "reference": row["caption"]})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write(args.out, text, durable=False)
        print(f"wrote {len(lines)} lines to {args.out}")
    else:
        sys.stdout.write(text)
    if summary:
        print(summary, file=sys.stderr)
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="captions for images from a CoCa checkpoint (greedy, beam, top-p), as JSONL",
                       description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a CoCa run's checkpoint root, one step directory, or an exported .safetensors file")
    p.add_argument("--images", required=True,
                   help="a folder of images (.jpg .png .webp .bmp, any size) or a shard spec")
    p.add_argument("--out", metavar="FILE", help="write JSONL {key, caption} here (default: stdout); keys are file "
                                                 "names, or shard:position for a spec; a folder's unreadable file "
                                                 "is a line {key, error} in its place (name order)")
    add_generation_flags(p, max_length=30)
    p.set_defaults(func=_run)
