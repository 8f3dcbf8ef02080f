"""``moe-dist-data synth``: a procedural image-caption dataset, deterministic by seed, no download.

Each image shows ``count`` copies of one coloured shape (small or large, on the left or right), and
sometimes a second object of another shape and colour on the other side. Captions are compositional
("two small red circles left of a blue square"); the zero-shot label is the main object's
"<colour> <shape>" (CLASSES, 12 classes), stored in each sample's json with all attributes.

Each sample's json also holds question/answer pairs about its scene (``qa``: colour, shape, count and
yes/no questions, see ``qa_pairs``). ``vqa_items`` turns them into VQA samples (text "question: Q answer:
A", json ``question``/``answer``/``question_type``); scenes whose main object is a HELDOUT colour-shape
combination are kept apart (``heldout=True``), a generalisation split: training sees those combinations
only as the second object.
"""

from __future__ import annotations

import io
import random
from typing import Dict, Iterator, List, Optional

from PIL import Image, ImageDraw

from .sources import Item

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ["circle", "square", "triangle"]
CLASSES: List[str] = [f"{c} {s}" for c in COLORS for s in SHAPES]
NUMBERS = {1: "one", 2: "two", 3: "three"}
TEMPLATES = ["a photo of a {}.", "a {} on a plain background.", "a picture showing a {}."]
HELDOUT = ("red triangle", "green circle", "blue square", "yellow circle")  # main-object combinations held out
VQA_PROMPT = "question: {} answer:"  # moe_dist.generation.vqa_prompt


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
    meta["qa"] = qa_pairs(meta)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return {"jpg": out.getvalue(), "txt": caption, "json": meta}


def qa_pairs(meta: Dict[str, object]) -> List[Dict[str, str]]:
    """Questions the scene answers (no randomness: the image's draws stay as they were).

    colour: "what colour is the <shape>?"; shape: "what shape is the <colour> object?"; count: "how many
    <shape>s are there?" (one/two/three); yes/no: "is the <shape> left of the <other shape>?"."""
    color, shape = str(meta["class"]).split()
    pairs = [{"question": f"what colour is the {shape}?", "answer": color, "type": "colour"},
             {"question": f"what shape is the {color} object?", "answer": shape, "type": "shape"},
             {"question": f"how many {shape}s are there?", "answer": NUMBERS[int(meta["count"])], "type": "count"}]
    if "other" in meta:
        other_color, other_shape = str(meta["other"]).split()
        pairs += [{"question": f"what colour is the {other_shape}?", "answer": other_color, "type": "colour"},
                  {"question": f"what shape is the {other_color} object?", "answer": other_shape, "type": "shape"}]
        first, second = (shape, other_shape) if meta["position"] == "left" else (other_shape, shape)
        asked = (first, second) if meta["size"] == "large" else (second, first)  # yes and no both occur
        pairs.append({"question": f"is the {asked[0]} left of the {asked[1]}?", "answer": "yes" if asked[0] == first
                      else "no", "type": "yes/no"})
    return pairs


def synth_items(n: int, seed: int, size: int = 64) -> Iterator[Item]:
    for index in range(n):
        sample = make_sample(index, seed, size)
        yield Item(f"synth:{index}", sample["txt"], data=sample["jpg"], ext="jpg", meta=sample["json"])


def vqa_items(n: int, seed: int, size: int = 64, heldout: Optional[bool] = False) -> Iterator[Item]:
    """One VQA sample per question of each of ``n`` scenes: those whose main object is a HELDOUT combination
    (``heldout=True``), the others (False), or all (None)."""
    for index in range(n):
        sample = make_sample(index, seed, size)
        meta = sample["json"]
        if heldout is not None and (meta["class"] in HELDOUT) != heldout:
            continue
        for j, qa in enumerate(meta["qa"]):
            text = f"{VQA_PROMPT.format(qa['question'])} {qa['answer']}"
            yield Item(f"synth-vqa:{index}:{j}", text, data=sample["jpg"], ext="jpg",
                       meta={**meta, "question": qa["question"], "answer": qa["answer"], "question_type": qa["type"]})
