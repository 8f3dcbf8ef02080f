"""``moe-dist-data synth``: a procedural image-caption dataset, deterministic by seed, no download.

Each image shows ``count`` copies of one coloured shape (small or large, on the left or right), and
sometimes a second object of another shape and colour on the other side. Captions are compositional
("two small red circles left of a blue square"); the zero-shot label is the main object's
"<colour> <shape>" (CLASSES, 12 classes), stored in each sample's json with all attributes.
"""

from __future__ import annotations

import io
import random
from typing import Dict, Iterator, List

from PIL import Image, ImageDraw

from .sources import Item

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ["circle", "square", "triangle"]
CLASSES: List[str] = [f"{c} {s}" for c in COLORS for s in SHAPES]
NUMBERS = {1: "one", 2: "two", 3: "three"}
TEMPLATES = ["a photo of a {}.", "a {} on a plain background.", "a picture showing a {}."]


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


def make_sample(index: int, seed: int, size: int = 64) -> Dict[str, object]:
    rng = random.Random(seed * 1_000_003 + index)
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    count, big = rng.choice([1, 1, 2, 3]), rng.random() < 0.5
    side = rng.choice(["left", "right"])
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = size // (3 if big else 5)
    half = size // 2
    x_lo = 0 if side == "left" else half
    for _ in range(count):
        x = rng.randint(x_lo, x_lo + half - extent)
        y = rng.randint(0, size - extent)
        _draw(draw, shape, (x, y, x + extent, y + extent), COLORS[color])
    noun = shape + ("s" if count > 1 else "")
    caption = f"{NUMBERS[count] if count > 1 else 'a'} {'large' if big else 'small'} {color} {noun}"
    meta = {"label": CLASSES.index(f"{color} {shape}"), "class": f"{color} {shape}", "count": count,
            "size": "large" if big else "small", "position": side}
    if rng.random() < 0.5:
        other_color = rng.choice([c for c in COLORS if c != color])
        other_shape = rng.choice([s for s in SHAPES if s != shape])
        x = rng.randint(half - x_lo, 2 * half - x_lo - size // 5) if x_lo == 0 else rng.randint(0, half - size // 5)
        y = rng.randint(0, size - size // 5)
        _draw(draw, other_shape, (x, y, x + size // 5, y + size // 5), COLORS[other_color])
        caption += f" {'left' if side == 'left' else 'right'} of a {other_color} {other_shape}"
        meta["other"] = f"{other_color} {other_shape}"
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return {"jpg": out.getvalue(), "txt": caption, "json": meta}


def synth_items(n: int, seed: int, size: int = 64) -> Iterator[Item]:
    for index in range(n):
        sample = make_sample(index, seed, size)
        yield Item(f"synth:{index}", sample["txt"], data=sample["jpg"], ext="jpg", meta=sample["json"])
