"""Model configs: typed dataclasses loaded from JSON files in configs/models/, validated up front.

A model JSON holds ``kind`` ("clip" two-tower, "limoe" single-tower, or "coca": two towers plus a
multimodal text decoder, ``decoder``), ``embed_dim``, ``vision``,
``text``, ``moe`` (MoEConfig fields except the hidden sizes) and, per tower, where the MoE layers go.
Keys starting with "_" are comments (each shipped config states its parameter counts there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config import from_dict, merge
from ..moe.config import MoEConfig
from ..moe.registry import ROUTERS
from ..text.tokenizer import sentencepiece_path
from .loss import CONTRASTIVE_LOSSES
from .openclip_arch import PREFIX, arch_model_dict, check_limoe, is_openclip

KINDS = ("clip", "limoe", "coca")
IMAGE_TOKENS = ("patches", "pooler")  # model.decoder.image_tokens
# tower -> the config key of its MoE placement (LIMoE's shared tower is placed by the vision key)
PLACEMENT_KEYS = {"vision": "model.vision.moe", "text": "model.text.moe", "decoder": "model.decoder.moe",
                  "decoder_cross": "model.decoder.cross_moe"}
# What every checkpoint directory (and export) carries besides the weights, so that it loads on its own:
MODEL_CONFIG_FILE = "model_config.json"  # the resolved ModelConfig as JSON; text.tokenizer relative to it
TOKENIZER_FILE = "tokenizer.model"  # a copy of the run's sentencepiece model (absent for openclip-bpe)
# A Hub folder (``moe-dist export --format hub``; read by load_pretrained): config.json holds the format, the
# ModelConfig and the run's record; model.safetensors is an export file; tokenizer.model as in a checkpoint
HUB_FORMAT = "moe_dist.hub/1"
HUB_CONFIG_FILE = "config.json"
HUB_WEIGHTS_FILE = "model.safetensors"


@dataclass
class MoEPlacement:
    """Which transformer blocks get an MoE MLP: every n-th (``every``, starting at block every-1),
    an explicit ``blocks`` list, or the ``last`` k blocks. All zero/empty means a dense tower.
    ``overrides``: MoEConfig fields for this tower's MoE layers over ``model.moe`` (e.g. ``{"router":
    "soft"}`` for a Soft MoE image tower beside a top-k text tower)."""

    every: int = 0
    blocks: List[int] = field(default_factory=list)
    last: int = 0
    overrides: Dict[str, Any] = field(default_factory=dict)

    def indices(self, num_layers: int, where: str) -> List[int]:
        chosen = set(self.blocks)
        if self.every:
            chosen |= set(range(self.every - 1, num_layers, self.every))
        if self.last:
            chosen |= set(range(max(0, num_layers - self.last), num_layers))
        bad = sorted(i for i in chosen if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"{where}.blocks={bad} is out of range: the tower has {num_layers} blocks "
                             f"(valid indices 0..{num_layers - 1})")
        return sorted(chosen)


def _positive(section: object, where: str, *names: str) -> None:
    """ValueError naming the first field of ``section`` that is not > 0 (sizes divide and multiply)."""
    for name in names:
        if not getattr(section, name) > 0:
            raise ValueError(f"{where}{name}={getattr(section, name)} must be > 0")


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    moe: MoEPlacement = field(default_factory=MoEPlacement)

    def __post_init__(self) -> None:
        _positive(self, "model.vision.", "image_size", "patch_size", "width", "layers", "heads", "mlp_ratio")


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    pad_id: int = 0
    eos_id: int = 49407
    pool_type: str = "argmax"  # "argmax" for open_clip's BPE (EOT has the largest id), "eos" otherwise
    tokenizer: str = "openclip-bpe"  # or "sentencepiece:<path to .model>" (a run's data.tokenizer overrides it)
    moe: MoEPlacement = field(default_factory=MoEPlacement)

    def __post_init__(self) -> None:
        _positive(self, "model.text.", "vocab_size", "context_length", "width", "layers", "heads", "mlp_ratio")
        for name in ("pad_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"model.text.{name}={getattr(self, name)} must be a token id in [0, vocab_size="
                                 f"{self.vocab_size})")


@dataclass
class DecoderConfig:
    """CoCa's multimodal text decoder (kind=coca): open_clip's MultimodalTransformer at ``width``,
    each layer a causal self-attention block then a cross-attention block over the image tokens."""

    layers: int = 0  # decoder layers (kind=coca needs >= 1)
    heads: int = 0  # attention heads (0: text.heads)
    mlp_ratio: float = 4.0  # MLP hidden = decoder width x mlp_ratio
    moe: MoEPlacement = field(default_factory=MoEPlacement)  # MoE MLPs in the self-attention blocks
    cross_moe: MoEPlacement = field(default_factory=MoEPlacement)  # MoE MLPs in the cross-attention blocks
    width: int = 0  # decoder width (0: text.width); another width maps the text states through a linear layer
    caption_loss_weight: float = 2.0  # weight of the next-token captioning loss (open_clip's CoCa default)
    contrastive_loss_weight: float = 1.0  # weight of the contrastive loss
    label_smoothing: float = 0.0  # of the caption cross-entropy (the CoCa paper: 0.1)
    lr_scale: float = 1.0  # the decoder's learning rate (and the maps into it) = optimizer.lr x this
    loss_after: str = ""  # caption loss only after this text's last occurrence ("answer:" for VQA); "": every token
    image_tokens: str = "patches"  # decoder memory: patch tokens (linear map) or "pooler" (attentional pooler)
    pooler_queries: int = 32  # image_tokens=pooler: its learnt queries (the decoder's image tokens)

    def __post_init__(self) -> None:
        _positive(self, "model.decoder.", "mlp_ratio", "pooler_queries", "lr_scale")
        if self.layers < 0 or self.heads < 0 or self.width < 0:
            raise ValueError(f"model.decoder.layers={self.layers}, heads={self.heads} and width={self.width} must "
                             "be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"model.decoder.label_smoothing={self.label_smoothing} must lie in [0, 1)")
        if self.image_tokens not in IMAGE_TOKENS:
            raise ValueError(f"model.decoder.image_tokens={self.image_tokens!r} is unknown; use one of "
                             f"{', '.join(IMAGE_TOKENS)}")


@dataclass
class ModelConfig:
    name: str = "custom"
    kind: str = "clip"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    moe: Dict[str, Any] = field(default_factory=lambda: {"num_experts": 8, "top_k": 1})
    loss: str = "clip"
    init_logit_scale: float = 2.659260036932778  # ln(1/0.07), open_clip's default
    init_logit_bias: Optional[float] = None  # SigLIP uses -10
    quick_gelu: bool = False  # open_clip's QuickGELU in the dense MLPs (OpenAI CLIP); experts: model.moe.activation

    def __post_init__(self) -> None:
        _positive(self, "model.", "embed_dim")
        if self.kind not in KINDS:
            raise ValueError(f"model.kind={self.kind!r} is unknown; use one of {KINDS}")
        if self.loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"model.loss={self.loss!r} is unknown; use one of {sorted(CONTRASTIVE_LOSSES)}")
        v, t = self.vision, self.text
        if v.image_size % v.patch_size:
            raise ValueError(f"model.vision.image_size={v.image_size} is not divisible by "
                             f"model.vision.patch_size={v.patch_size}; pick sizes with image_size % patch_size == 0")
        if t.context_length < 2:
            raise ValueError(f"model.text.context_length={t.context_length} must be >= 2 (room for BOS and EOS)")
        sentencepiece_path(t.tokenizer)  # the form; the file is checked when the tokenizer is loaded
        if t.pool_type not in ("argmax", "eos", "last", "first"):
            raise ValueError(f"model.text.pool_type={t.pool_type!r}; use 'argmax', 'eos', 'last' or 'first'")
        for name, tower in (("vision", v), ("text", t)):
            if tower.width % tower.heads:
                raise ValueError(f"model.{name}.width={tower.width} is not divisible by heads={tower.heads}")
        if self.kind == "limoe" and v.width != t.width:
            raise ValueError(f"LIMoE shares one transformer: model.vision.width={v.width} must equal "
                             f"model.text.width={t.width}")
        self.vision_moe_blocks()
        self.text_moe_blocks()
        self._check_decoder()
        self._check_tower_moe()

    def _check_decoder(self) -> None:
        d = self.decoder
        if self.kind != "coca":
            if d.layers:
                raise ValueError(f"model.decoder.layers={d.layers} needs model.kind='coca' (got {self.kind!r})")
            return
        if d.layers < 1:
            raise ValueError("model.kind='coca' needs a multimodal decoder: set model.decoder.layers >= 1")
        heads, width = d.heads or self.text.heads, self.decoder_width
        if width % heads:
            raise ValueError(f"model.decoder.heads={heads} must divide the decoder width {width} (model.decoder.width, "
                             "0: model.text.width)")
        if not min(d.caption_loss_weight, d.contrastive_loss_weight) >= 0:
            raise ValueError("model.decoder.caption_loss_weight and contrastive_loss_weight must be >= 0 (got "
                             f"{d.caption_loss_weight}, {d.contrastive_loss_weight})")
        self.decoder_moe_blocks()

    @property
    def decoder_width(self) -> int:
        """The multimodal decoder's width: ``decoder.width``, or the text tower's when 0."""
        return self.decoder.width or self.text.width

    def decoder_moe_blocks(self) -> Dict[str, List[int]]:
        """{"decoder": self-attention block indices, "decoder_cross": cross-attention block indices}."""
        d = self.decoder
        return {"decoder": d.moe.indices(d.layers, "model.decoder.moe"),
                "decoder_cross": d.cross_moe.indices(d.layers, "model.decoder.cross_moe")}

    def vision_moe_blocks(self) -> List[int]:
        return self.vision.moe.indices(self.vision.layers, "model.vision.moe")

    def text_moe_blocks(self) -> List[int]:
        return self.text.moe.indices(self.text.layers, "model.text.moe")

    def _placements(self) -> Dict[str, MoEPlacement]:
        """tower name -> its placement (LIMoE's shared tower is placed by ``vision``)."""
        d = self.decoder
        return {"vision": self.vision.moe, "text": self.text.moe, "decoder": d.moe, "decoder_cross": d.cross_moe}

    def _tower_shapes(self) -> Dict[str, tuple]:
        """tower -> (width, mlp_ratio) of its MoE layers."""
        v, t, d = self.vision, self.text, self.decoder
        return {"vision": (v.width, v.mlp_ratio), "text": (t.width, t.mlp_ratio),
                "decoder": (self.decoder_width, d.mlp_ratio), "decoder_cross": (self.decoder_width, d.mlp_ratio)}

    def tower_moe(self) -> Dict[str, MoEConfig]:
        """Each tower with MoE layers -> their MoEConfig (``model.moe`` with the tower's overrides), in the
        order vision, text, decoder, decoder_cross. LIMoE's shared tower is "vision" (its text placement
        places nothing); a dense model gives {}."""
        blocks = {"vision": self.vision_moe_blocks(), "text": [] if self.kind == "limoe" else self.text_moe_blocks(),
                  **(self.decoder_moe_blocks() if self.kind == "coca" else {})}
        return {tower: self.moe_config(width, ratio, tower) for tower, (width, ratio) in self._tower_shapes().items()
                if blocks.get(tower)}

    def moe_key(self, tower: str, name: str) -> str:
        """The config key that sets MoEConfig field ``name`` for ``tower``'s MoE layers: its overrides'
        when they set it, else model.moe's ("" for no tower)."""
        if tower and name in self._placements()[tower].overrides:
            return f"{PLACEMENT_KEYS[tower]}.overrides.{name}"
        return f"model.moe.{name}"

    def expert_counts(self) -> List[int]:
        """num_experts of every tower with MoE layers (``model.moe``'s when there is none): ep_size must
        divide each."""
        return sorted({m.num_experts for m in self.tower_moe().values()}) or [self.moe_config(
            self.vision.width, self.vision.mlp_ratio).num_experts]

    def _check_tower_moe(self) -> None:
        """Every tower's MoE fields are valid, and a router that mixes the tokens of a sequence
        (Expert-Choice, Soft MoE) is only where no token is causal: not in the text tower of kind clip or
        coca (open_clip's causal text encoder), nor in CoCa's decoder."""
        v = self.vision
        causal = ["text", "decoder", "decoder_cross"] if self.kind != "limoe" else []
        blocks = {"vision": self.vision_moe_blocks(), "text": self.text_moe_blocks(), **self.decoder_moe_blocks()}
        for tower in causal:
            router = {**self.moe, **self._placements()[tower].overrides}.get("router", "topk")
            if blocks[tower] and router in ROUTERS and not ROUTERS.get(router).token_choice:
                where = PLACEMENT_KEYS[tower]
                raise ValueError(f"{where}: router={router!r} picks tokens by looking at the whole sequence, but "
                                 f"the {tower.replace('_', ' ')} blocks are causal (a token may not depend on later "
                                 f"ones); set {where}.overrides.router=topk (or place no MoE layer there)")
        self.moe_config(v.width, v.mlp_ratio)  # model.moe itself, with no tower's overrides
        for tower, (width, mlp_ratio) in self._tower_shapes().items():
            self.moe_config(width, mlp_ratio, tower)

    def moe_config(self, width: int, mlp_ratio: float = 4.0, tower: str = "") -> MoEConfig:
        """The MoEConfig of a tower's MoE layers: ``model.moe`` with the tower's ``overrides`` ("vision",
        "text", "decoder", "decoder_cross"; "" for none)."""
        known = {f.name for f in dataclasses.fields(MoEConfig)} - {"hidden_size", "ffn_hidden_size"}
        overrides = self._placements()[tower].overrides if tower else {}
        where_overrides = f"{PLACEMENT_KEYS.get(tower)}.overrides"
        for where, given in (("model.moe", self.moe), (where_overrides, overrides)):
            unknown = sorted(set(given) - known)
            if unknown:
                raise ValueError(f"{where} has unknown fields {unknown}; valid fields: {sorted(known)}")
        fields = {**self.moe, **overrides}
        if self.kind == "coca":  # three modalities: image, text and the decoder's cross-modal tokens
            reserved = list(fields.get("modality_experts", (0, 0)))
            fields["modality_experts"] = tuple(reserved + [0] * (3 - len(reserved)))
        # typed like every other section (finite numbers, the right types); errors name the config key that
        # set each field (model.moe.x, or the tower's overrides)
        try:
            return from_dict(MoEConfig, {**fields, "hidden_size": width, "ffn_hidden_size": int(width * mlp_ratio)},
                             where_overrides if overrides else "model.moe")
        except ValueError as err:
            message = re.sub(r"MoEConfig\.(\w+)", lambda m: self.moe_key(tower, m.group(1)), str(err))
            raise ValueError(message) from None


def model_config_dirs() -> List[Path]:
    """Where named model configs live: $MOE_DIST_CONFIG_DIR/models, the source tree, the install prefix."""
    dirs = []
    if os.environ.get("MOE_DIST_CONFIG_DIR"):
        dirs.append(Path(os.environ["MOE_DIST_CONFIG_DIR"]) / "models")
    dirs.append(Path(__file__).resolve().parents[2] / "configs" / "models")
    dirs.append(Path(sys.prefix) / "share" / "moe_dist" / "configs" / "models")
    return [d for d in dirs if d.is_dir()]


def list_models() -> Dict[str, Path]:
    """Registry: model name (JSON file stem) -> path; earlier directories win."""
    found: Dict[str, Path] = {}
    for directory in model_config_dirs():
        for path in sorted(directory.glob("*.json")):
            found.setdefault(path.stem, path)
    return found


def load_model_config(name_or_path: str, overrides: Optional[Dict[str, Any]] = None) -> ModelConfig:
    """Load a model config by registry name, JSON path or ``open_clip:ARCH`` (open_clip's architecture,
    openclip_arch.py), apply nested ``overrides``, validate."""
    if is_openclip(name_or_path):
        data = merge(arch_model_dict(name_or_path[len(PREFIX):]), overrides or {})
        if data.get("kind") == "limoe":
            check_limoe(name_or_path[len(PREFIX):], data)
        return from_dict(ModelConfig, data, "model")
    registry = list_models()
    if name_or_path in registry:
        path = registry[name_or_path]
    elif name_or_path.endswith(".json") or os.path.sep in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"model config file {name_or_path!r} does not exist")
    else:
        raise ValueError(f"unknown model {name_or_path!r}; known models: {', '.join(sorted(registry)) or 'none'} "
                         f"(or pass a path to a model JSON, or {PREFIX}ARCH for an open_clip architecture)")
    with open(path) as f:
        data = json.load(f)
    data.setdefault("name", Path(path).stem)
    return from_dict(ModelConfig, merge(data, overrides or {}), "model")
