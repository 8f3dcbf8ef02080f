"""Published open_clip models by name: ``model.name: open_clip:ARCH`` and ``model.init: open_clip:ARCH/TAG``.

``open_clip:ARCH`` (``model.name``) is open_clip's own architecture JSON (``open_clip.get_model_config``)
mapped field by field onto our model JSON (``arch_model_dict``): the same widths, layers, heads, patch
size, context length, vocabulary, embed dim and logit scale, and open_clip's BPE tokenizer. What our
towers cannot build exactly is refused in one line naming the open_clip field: a non-ViT image tower
(ModifiedResNet, timm ConvNeXt/Swin/...: no transformer MLPs to turn into experts), a Hugging Face text
tower or tokenizer, layer scale, and every other option set away from open_clip's default. QuickGELU
architectures (``*-quickgelu``, for OpenAI's weights) map onto ``model.quick_gelu`` with QuickGELU experts.

``open_clip:ARCH/TAG`` (``model.init``) is a pretrained tag of ``open_clip.list_pretrained_tags_by_model``,
or ``open_clip:ARCH/PATH`` a weights file open_clip can load (``open_clip:ViT-B-32//abs/path.safetensors``).
Outline of what the run does with it:
    1. ``parse_init``: the arch exists, the tag is one of its tags (else the known tags are listed);
    2. ``check_same_arch``: the arch gives the run model's architecture (else the differing fields);
    3. ``locate_weights``: the tag's file in open_clip's cache (the Hugging Face hub cache, or
       ~/.cache/clip for URL tags), found without network; if absent, open_clip downloads it, and a
       failed download is refused at config load, naming the repository, file and cache directory;
    4. ``load_openclip``: ``open_clip.create_model(ARCH, pretrained=<that file>)``, whose state dict
       upcycle.py then copies into the MoE model.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

PREFIX = "open_clip:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# open_clip vision_cfg / text_cfg fields we map onto VisionConfig / TextConfig (the rest must keep open_clip's
# default: our towers are built with it)
_VISION_MAPPED = ("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio")
_TEXT_MAPPED = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id")
_TOP_MAPPED = ("embed_dim", "vision_cfg", "text_cfg", "init_logit_scale", "init_logit_bias", "custom_text",
               "quick_gelu")
# the architecture a model.init must share with model.name (ModelConfig keys)
ARCH_FIELDS = ("embed_dim", "quick_gelu", "vision.image_size", "vision.patch_size", "vision.width", "vision.layers",
               "vision.heads", "vision.mlp_ratio", "text.vocab_size", "text.context_length", "text.width",
               "text.layers", "text.heads", "text.mlp_ratio")


def is_openclip(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def _arch_config(arch: str, where: str) -> Dict[str, Any]:
    """open_clip's JSON of ``arch``; ValueError with the nearest names when open_clip has none."""
    import open_clip

    known = [m for m in open_clip.list_models()]
    config = open_clip.get_model_config(arch) if arch in known else None
    if config is None:
        near = difflib.get_close_matches(arch, known, n=5)
        raise ValueError(f"{where}: open_clip {open_clip.__version__} has no architecture {arch!r}"
                         f"{'; nearest: ' + ', '.join(near) if near else ''} (open_clip.list_models() lists all "
                         f"{len(known)})")
    return config


def _refuse_unmapped(section: Dict[str, Any], defaults: object, mapped, where: str, field: str) -> None:
    for key, value in section.items():
        if key not in mapped and value != getattr(defaults, key, object()):
            raise ValueError(f"{where}: {field}.{key}={value!r} is not supported (moe_dist's towers build open_clip's "
                             f"default for it, {getattr(defaults, key, None)!r}); pick an architecture without it")


def arch_model_dict(arch: str, where: str = "model.name") -> Dict[str, Any]:
    """Our model JSON (a dict for ``ModelConfig``) of open_clip architecture ``arch``, kind "clip", dense.

    Raises:
        ValueError (one line, starting with ``where``): an unknown arch, or one our towers cannot build
        exactly (module docstring).
    """
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    where = f"{where}={PREFIX}{arch}"
    config = _arch_config(arch, where)
    v, t = dict(config.get("vision_cfg", {})), dict(config.get("text_cfg", {}))
    if "multimodal_cfg" in config:
        raise ValueError(f"{where} is a CoCa architecture (multimodal_cfg); only two-tower CLIP architectures map onto "
                         "moe_dist's models (e.g. open_clip:ViT-B-32)")
    if v.get("timm_model_name") or isinstance(v.get("layers"), (list, tuple)):
        tower = f"timm's {v['timm_model_name']}" if v.get("timm_model_name") else \
            f"a ModifiedResNet (vision_cfg.layers={list(v['layers'])})"
        raise ValueError(f"{where}: the image tower is {tower}, not open_clip's VisionTransformer, the one image "
                         "tower moe_dist builds and places experts in (model.vision.moe: transformer blocks whose MLPs "
                         "become experts); pick an open_clip ViT architecture (e.g. open_clip:ViT-B-32)")
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if t.get(key):
            raise ValueError(f"{where}: text_cfg.{key}={t[key]!r} is a Hugging Face text tower or tokenizer; moe_dist "
                             "builds open_clip's own text transformer with its BPE tokenizer (openclip-bpe); pick an "
                             "architecture without it (e.g. open_clip:ViT-B-32)")
    extra = sorted(k for k in config if k not in _TOP_MAPPED)
    if extra:
        raise ValueError(f"{where}: {extra[0]}={config[extra[0]]!r} is not supported by moe_dist's models; pick an "
                         "architecture without it")
    _refuse_unmapped(v, CLIPVisionCfg(), _VISION_MAPPED, where, "vision_cfg")
    _refuse_unmapped(t, CLIPTextCfg(), _TEXT_MAPPED + ("pool_type",), where, "text_cfg")
    if t.get("pool_type", "argmax") != "argmax":
        raise ValueError(f"{where}: text_cfg.pool_type={t['pool_type']!r} is not supported for open_clip's BPE "
                         "tokenizer (moe_dist pools it at the EOT token, 'argmax')")
    vd, td = CLIPVisionCfg(), CLIPTextCfg()
    image_size = v.get("image_size", vd.image_size)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ValueError(f"{where}: vision_cfg.image_size={list(image_size)} is not square; moe_dist's image "
                             "towers take square images")
        image_size = image_size[0]
    width, head_width = v.get("width", vd.width), v.get("head_width", vd.head_width)
    if width % head_width:
        raise ValueError(f"{where}: vision_cfg.width={width} is not a multiple of head_width={head_width}")
    return {
        "name": f"{PREFIX}{arch}",
        "kind": "clip",
        "embed_dim": config["embed_dim"],
        "vision": {"image_size": image_size, "patch_size": v.get("patch_size", vd.patch_size), "width": width,
                   "layers": v.get("layers", vd.layers), "heads": width // head_width,
                   "mlp_ratio": v.get("mlp_ratio", vd.mlp_ratio)},
        "text": {"vocab_size": t.get("vocab_size", td.vocab_size), "context_length": t.get("context_length",
                                                                                          td.context_length),
                 "width": t.get("width", td.width), "layers": t.get("layers", td.layers),
                 "heads": t.get("heads", td.heads), "mlp_ratio": t.get("mlp_ratio", td.mlp_ratio),
                 "pad_id": t.get("pad_id", td.pad_id), "pool_type": "argmax", "tokenizer": "openclip-bpe"},
        "init_logit_scale": config.get("init_logit_scale", math.log(1 / 0.07)),
        "init_logit_bias": config.get("init_logit_bias"),
        # QuickGELU in the dense MLPs, and by default in the experts, which upcycling copies them into
        "quick_gelu": bool(config.get("quick_gelu", False)),
        "moe": {"num_experts": 8, "top_k": 1, "activation": "quick_gelu" if config.get("quick_gelu") else "gelu"},
    }


def check_limoe(arch: str, data: Dict[str, Any]) -> None:
    """LIMoE shares one transformer for image and text: refuse an arch whose two towers differ."""
    v, t = data["vision"], data["text"]
    differ = [f"{key} {v[key]} vs {t[key]}" for key in ("width", "layers", "heads", "mlp_ratio") if v[key] != t[key]]
    if differ:
        raise ValueError(f"model.name={PREFIX}{arch} with model.kind=limoe: LIMoE shares one transformer for image "
                         f"and text, but {arch}'s towers differ (vision vs text: {', '.join(differ)}); use kind clip, "
                         "or an architecture whose towers match (e.g. open_clip:ViT-S-32, open_clip:ViT-M-32)")


# ---------------------------------------------------------------------------------------------- model.init
@dataclass
class OpenClipInit:
    """A parsed ``model.init: open_clip:ARCH/TAG`` (or ``open_clip:ARCH/PATH``).

    Attributes:
        spec: the string as given.
        arch: open_clip architecture name.
        tag: a pretrained tag of ``arch`` ("" when a file was given).
        file: the weights file given ("" for a tag).
    """

    spec: str
    arch: str
    tag: str = ""
    file: str = ""


def parse_init(spec: str) -> OpenClipInit:
    """``open_clip:ARCH/TAG`` or ``open_clip:ARCH/PATH`` -> OpenClipInit; ValueError (one line) otherwise."""
    import open_clip

    where = f"model.init={spec}"
    arch, _, rest = spec[len(PREFIX):].partition("/")
    _arch_config(arch, where)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not rest:
        raise ValueError(f"{where}: give a pretrained tag or a file after the architecture, open_clip:{arch}/TAG "
                         f"(tags for {arch}: {', '.join(tags) or 'none'}) or open_clip:{arch}//path/to/weights")
    if open_clip.is_pretrained_cfg(arch, rest):
        return OpenClipInit(spec, arch, tag=rest)
    if os.sep in rest or rest.endswith(WEIGHT_SUFFIXES):
        if not os.path.isfile(rest):
            raise ValueError(f"{where}: {rest} is not a file; give open_clip weights saved for {arch} (e.g. "
                             "torch.save(open_clip_model.state_dict(), PATH)) or a pretrained tag")
        return OpenClipInit(spec, arch, file=rest)
    raise ValueError(f"{where}: open_clip has no pretrained tag {rest!r} for {arch}; known tags: "
                     f"{', '.join(tags) or 'none'} (or give a file: open_clip:{arch}//path/to/weights)")


def check_same_arch(init: OpenClipInit, model: Dict[str, Any], model_name: str) -> None:
    """Refuse (one line naming the differing fields) a model.init arch other than the run model's.

    Args:
        model: the run's ModelConfig as a dict (``dataclasses.asdict``).
    """
    source = arch_model_dict(init.arch, where="model.init")

    def get(data, key):
        for part in key.split("."):
            data = data[part]
        return data

    differ = [f"{key} {get(source, key)} vs {get(model, key)}" for key in ARCH_FIELDS
              if get(source, key) != get(model, key)]
    if differ:
        raise ValueError(f"model.init={init.spec}: {init.arch} is not the architecture of model.name={model_name} "
                         f"({init.arch} vs model: {', '.join(differ)}); set model.name={PREFIX}{init.arch}, or init "
                         "from weights of the model's architecture")


def _hf_files(hf_hub: str) -> tuple:
    """(repo id, the file names open_clip tries in order) of a pretrained cfg's ``hf_hub`` entry."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(hf_hub)
    if not filename:
        return repo, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    stem, ext = os.path.splitext(filename)
    return repo, ([stem + ".safetensors"] if ext in (".bin", ".pth") else []) + [filename]


def cached_weights(pretrained_cfg: Dict[str, Any]) -> Optional[str]:
    """The local file of a pretrained tag in open_clip's cache, found without network; None if absent."""
    if pretrained_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, names = _hf_files(pretrained_cfg["hf_hub"])
        for name in names:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    url = pretrained_cfg.get("url", "")
    path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    return path if url and os.path.isfile(path) else None


def _unreachable(pretrained_cfg: Dict[str, Any]) -> str:
    """Why a download cannot start ("HF_HUB_OFFLINE is set", "<host> does not resolve"), "" if it may
    (always behind an HTTPS proxy, which resolves names itself)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if pretrained_cfg.get("hf_hub"):
        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set"
        host = urlparse(constants.ENDPOINT).hostname
    else:
        host = urlparse(pretrained_cfg.get("url", "")).hostname
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return ""  # the proxy resolves the host, which may not resolve here: let the download try
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return f"{host} does not resolve: no network"
    return ""


def _where_to_get(init: OpenClipInit, pretrained_cfg: Dict[str, Any]) -> str:
    if pretrained_cfg.get("hf_hub"):
        from huggingface_hub import constants

        repo, names = _hf_files(pretrained_cfg["hf_hub"])
        what = f"https://huggingface.co/{repo} file {' or '.join(names)} into the Hugging Face cache " \
               f"(HF_HUB_CACHE={constants.HF_HUB_CACHE})"
    else:
        what = f"{pretrained_cfg.get('url')} into {os.path.expanduser('~/.cache/clip')}"
    return (f"download {what} on a machine with network, e.g. python -c \"import open_clip; "
            f"open_clip.create_model('{init.arch}', pretrained='{init.tag}')\", or set "
            f"model.init={PREFIX}{init.arch}//path/to/the/file")


def locate_weights(init: OpenClipInit) -> str:
    """The local weights file of ``init``: the file given, or the tag's file in open_clip's cache (downloaded
    by open_clip when absent). ValueError (one line) when it is neither cached nor downloadable, or was
    trained with another activation or preprocessing than the model's (``_check_preprocess``)."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    if init.file:
        return init.file
    pretrained_cfg = open_clip.get_pretrained_cfg(init.arch, init.tag)
    _check_activation(init, bool(pretrained_cfg.get("quick_gelu")))
    _check_preprocess(init, pretrained_cfg)
    found = cached_weights(pretrained_cfg)
    if found:
        return found
    unreachable = _unreachable(pretrained_cfg)  # no retry storm (about a minute) where there is no network
    try:
        if unreachable:
            raise ConnectionError(unreachable)
        target = download_pretrained(pretrained_cfg)
    except Exception as err:  # noqa: BLE001 - hub, HTTP and offline-mode errors alike
        why = unreachable or type(err).__name__
        raise ValueError(f"model.init={init.spec}: the weights are not in open_clip's cache and could not be "
                         f"downloaded ({why}); {_where_to_get(init, pretrained_cfg)}") from None
    if not target or not os.path.isfile(target):
        raise ValueError(f"model.init={init.spec}: open_clip found no weights; {_where_to_get(init, pretrained_cfg)}")
    return target


def _check_activation(init: OpenClipInit, tag_quick_gelu: bool) -> None:
    """Refuse a tag trained with another activation than its architecture computes (open_clip itself only
    warns), naming the architecture that fits."""
    import open_clip

    arch_quick_gelu = bool(_arch_config(init.arch, f"model.init={init.spec}").get("quick_gelu"))
    if tag_quick_gelu == arch_quick_gelu:
        return
    base = init.arch[:-len("-quickgelu")] if init.arch.endswith("-quickgelu") else init.arch
    fits = f"{base}-quickgelu" if tag_quick_gelu else base
    acts = ("QuickGELU", "GELU") if tag_quick_gelu else ("GELU", "QuickGELU")
    fix = (f"use model.name={PREFIX}{fits} and model.init={PREFIX}{fits}/{init.tag}"
           if init.tag in open_clip.list_pretrained_tags_by_model(fits) else "pick another tag")
    raise ValueError(f"model.init={init.spec}: tag {init.tag} was trained with {acts[0]} but {init.arch} computes "
                     f"{acts[1]}; {fix}")


def _check_preprocess(init: OpenClipInit, pretrained_cfg: Dict[str, Any]) -> None:
    """Refuse a tag trained on other pixels than our eval transform gives (``PreprocessCfg``'s defaults:
    CLIP mean/std, bicubic, resize of the shortest side), naming the first difference; open_clip would
    apply the tag's own, which moe_dist's data pipeline does not."""
    from open_clip.transform import PreprocessCfg

    ours = PreprocessCfg()
    for key in ("mean", "std", "interpolation", "resize_mode"):
        theirs = pretrained_cfg.get(key)
        theirs = tuple(theirs) if isinstance(theirs, list) else theirs
        if theirs is not None and theirs != getattr(ours, key):
            raise ValueError(f"model.init={init.spec}: tag {init.tag} was trained with {key}={theirs!r} but "
                             f"moe_dist's image transform uses {key}={getattr(ours, key)!r}, so the weights would see "
                             "other pixels; pick a tag with open_clip's default preprocessing, or accept the "
                             f"difference by giving the file: model.init={PREFIX}{init.arch}//path/to/the/file")


def load_openclip(init: OpenClipInit):
    """open_clip's own dense model of ``init`` (fp32, CPU, eval), built by ``open_clip.create_model``."""
    import open_clip

    path = locate_weights(init)
    try:
        model = open_clip.create_model(init.arch, pretrained=path, device="cpu")
    except Exception as err:  # noqa: BLE001 - a state dict of another architecture, an unreadable file
        lines = [line.strip() for line in str(err).strip().splitlines()] or [""]
        # torch's load_state_dict error starts with a header line; the first mismatch names the tensor
        first = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                     lines[0])[:200]
        raise ValueError(f"model.init={init.spec}: open_clip could not load {path} into {init.arch} "
                         f"({type(err).__name__}: {first}); give weights saved for {init.arch}") from None
    return model.eval()
