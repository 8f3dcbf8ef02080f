"""``moe-dist caption``: captions for a folder of images or a shard spec, from a CoCa checkpoint, as JSONL.

Images of any size are resized and centre-cropped to the model's input (open_clip's eval transform).
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


def folder_batches(directory: str, size: int, batch: int) -> Iterator[Tuple[List[str], "object"]]:
    """(file names, images [B, 3, S, S]) of a folder, in name order, any input size."""
    import torch
    from PIL import Image

    from ..data.evalset import default_eval_transform

    transform = default_eval_transform(size)
    files = image_files(directory)
    for start in range(0, len(files), batch):
        names = files[start:start + batch]
        images = []
        for name in names:
            try:
                with Image.open(os.path.join(directory, name)) as img:
                    images.append(transform(img.convert("RGB")))
            except OSError as err:
                raise ValueError(f"--images: {name} is not a readable image ({err})") from None
        yield names, torch.stack(images)


def _run(args: argparse.Namespace) -> int:
    from ..evaluation.captioning import generate_over
    from ..files import atomic_write
    from ..generation import generate
    import json

    cfg = generation_config(args)
    model, tokenizer = load_model(args.checkpoint)
    device = next(model.parameters()).device
    lines = []
    if os.path.isdir(args.images) and not os.path.exists(os.path.join(args.images, "manifest.json")) \
            and any(f.lower().endswith(IMAGE_EXTS) for f in os.listdir(args.images)):
        for names, images in folder_batches(args.images, model.cfg.vision.image_size, args.batch):
            for name, text in zip(names, generate(model, tokenizer, images.to(device), None, cfg)):
                lines.append({"key": name, "caption": text})
    else:
        for row in generate_over(model, tokenizer, args.images, "caption", cfg, args.batch,
                                 progress=sys.stderr.isatty()):
            lines.append({"key": f"{row['key'][0]}:{row['key'][1]}", "image_id": row["image_id"],
                          "caption": row["generated"], "reference": row["caption"]})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write(args.out, text, durable=False)
        print(f"wrote {len(lines)} captions to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="captions for images from a CoCa checkpoint (greedy, beam, top-p), as JSONL",
                       description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a CoCa run's checkpoint root, one step directory, or an exported .safetensors file")
    p.add_argument("--images", required=True,
                   help="a folder of images (.jpg .png .webp .bmp, any size) or a shard spec")
    p.add_argument("--out", metavar="FILE", help="write JSONL {key, caption} here (default: stdout); keys are file "
                                                 "names, or shard:position for a spec")
    add_generation_flags(p, max_length=30)
    p.set_defaults(func=_run)
