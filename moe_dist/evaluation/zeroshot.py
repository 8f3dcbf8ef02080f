"""Zero-shot classification inputs: class names and prompt templates, labels, and the text classifier.

Class names and templates come from a JSON file ``{"classes": [...], "templates": [...]}`` (what
``moe-dist-data synth`` writes as classes.json; "templates" optional), an explicit list, or open_clip's
ImageNet defaults. A sample's label is its JSON metadata ``label_key``: an int index into the class
names, or a class-name string.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

Template = Union[str, Callable[[str], str]]


@dataclass
class ClassSet:
    """C class names, T prompt templates (str with "{}" or callables) and where they came from."""

    names: List[str]
    templates: List[Template]
    source: str  # for messages: a path or "open_clip's ImageNet classes"


def load_classes(classes: Union[None, str, Sequence[str]] = None,
                 templates: Optional[Sequence[Template]] = None) -> ClassSet:
    """The class names and templates to classify with.

    Args:
        classes: a JSON file path, a list of names, or None for open_clip's ImageNet class names.
        templates: prompt templates; default: the file's "templates", else open_clip's OpenAI templates.
    Raises:
        ValueError: an unreadable file, no or duplicate class names, or a template without "{}".
    """
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    file_templates = None
    if classes is None:
        names, source = list(IMAGENET_CLASSNAMES), "open_clip's ImageNet class names"
    elif isinstance(classes, (str, os.PathLike)):
        source = os.fspath(classes)
        names, file_templates = _read_classes_file(source)
    else:
        names, source = [str(c) for c in classes], "the given class list"
    chosen = list(templates or file_templates or OPENAI_IMAGENET_TEMPLATES)
    if not names:
        raise ValueError(f"{source} lists no class names; the class list must name every class")
    bad = [t for t in chosen if not callable(t) and (not isinstance(t, str) or "{}" not in t)]
    if bad:
        raise ValueError(f"prompt template {bad[0]!r} has no '{{}}' for the class name; write e.g. "
                         "'a photo of a {}.'")
    return ClassSet(names, chosen, source)


CLASS_FILE_MAX_BYTES = 16 << 20


def _read_classes_file(path: str) -> Tuple[List[str], Optional[List[Template]]]:
    """The names and templates of a class file, checked whole: one ValueError line naming the file for
    anything else than a regular UTF-8 JSON file (at most 16 MiB) of that shape."""
    from ..data.localfiles import read_json_file, shown_value

    shape = '{"classes": ["cat", "dog"], "templates": ["a photo of a {}."]}'
    try:
        data = read_json_file(path, "class file", CLASS_FILE_MAX_BYTES)
    except OSError as err:
        raise ValueError(f"cannot read the class file {path!r} ({err}); give a JSON file {shape}") from None
    if data is None:
        raise ValueError(f"class file {path!r} does not exist; give a JSON file {shape}")
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise ValueError(f"class file {path!r} has no \"classes\" list; write it as {shape}")
    for i, name in enumerate(data["classes"]):
        if not isinstance(name, str):
            raise ValueError(f"class file {path!r}: classes[{i}] is {shown_value(name)}, not a class name (a string); "
                             f"write it as {shape}")
    templates = data.get("templates")
    if templates is not None and (not isinstance(templates, list) or not all(isinstance(t, str) for t in templates)):
        raise ValueError(f"class file {path!r}: \"templates\" must be a list of strings with '{{}}', not "
                         f"{shown_value(templates)}")
    return list(data["classes"]), templates


def resolve_labels(raw: Sequence[object], where: Sequence[Tuple[int, int]], classes: ClassSet,
                   label_key: str) -> torch.Tensor:
    """[N] class indices of the samples' raw labels (int index or class-name string).

    Args:
        raw: N label values from the samples' metadata (None where the key is missing).
        where: N (shard index, position) pairs, to name the first bad sample.
        classes: the class set the labels must match.
        label_key: the metadata key (for messages).
    Raises:
        ValueError: a missing label, an index outside the class list or a name not in it.
    """
    index = {}
    for i, name in enumerate(classes.names):  # a repeated name (open_clip's ImageNet has two) means its first
        index.setdefault(name, i)
    C = len(classes.names)
    out = torch.empty(len(raw), dtype=torch.long)
    for n, value in enumerate(raw):
        if isinstance(value, str) and value in index:
            out[n] = index[value]
            continue
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < C:
            out[n] = value
            continue
        shard, position = where[n]
        if value is None:
            problem = f"has no {label_key!r} in its json metadata (set the label key, e.g. --label-key)"
        elif isinstance(value, int) and not isinstance(value, bool):
            problem = f"has {label_key}={value}, outside the {C} class names of {classes.source}"
        else:
            problem = f"has {label_key}={value!r}, which is not a class name in {classes.source}"
        raise ValueError(f"sample {position} of shard {shard} {problem}: the class names do not match the "
                         "labels; give the dataset's class list (--classes FILE with {\"classes\": [...]})")
    return out


class _TextOnly:
    """open_clip's classifier builder calls ``encode_text(texts, normalize=True)``; our LIMoE's encode_text
    takes no ``normalize`` (it always normalises), so the builder sees this adapter instead."""

    def __init__(self, model):
        self.model = model

    def encode_text(self, texts: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return torch.nn.functional.normalize(self.model.encode_text(texts).float(), dim=-1)


def build_classifier(model, tokenizer: Callable, classes: ClassSet, device: torch.device) -> torch.Tensor:
    """[D, C] fp32 classifier: per class the normalised mean of its normalised template embeddings
    (open_clip's ``build_zero_shot_classifier``, 10 classes per forward). Call under ``torch.no_grad``."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    return build_zero_shot_classifier(_TextOnly(model), tokenizer, classes.names, classes.templates,
                                      num_classes_per_batch=10, device=device).float()
