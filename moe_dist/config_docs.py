"""Generate docs/configuration.md from the config dataclasses, so the reference cannot drift.

Regenerate with ``python -m moe_dist.config_docs > docs/configuration.md``; tests/unit/test_config_docs.py
fails when the file differs from what this module prints.

Outline:
    1. walk a dataclass (``RunConfig``, ``ModelConfig``, ``MoEConfig``) field by field, recursing into
       fields whose type is itself a dataclass (each becomes its own table, prefixed ``data.``, ...);
    2. a field's meaning is, in this order: its ``# comment`` on the field line (read with ``tokenize``
       from the class source), a ``name: text`` entry of the class docstring, or a line in ``NOTES``
       below (for fields whose source says nothing);
    3. fields that name a registry entry list the valid names, taken from the registry itself.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

# What the source does not say next to a field, keyed "Class.field". The unit test checks that every
# key names a real field, so a removed field takes its note with it.
NOTES: Dict[str, str] = {
    "RunConfig.output_dir": "run directory: run_config.json, metrics.jsonl, tensorboard/, checkpoints/",
    "RunConfig.seed": "model init (the same on every rank), per-rank RNGs, data order and augmentation",
    "RunConfig.compile": ("torch.compile: `none`; `blocks` (each transformer block); `model` (the whole forward as "
                          "one graph, fullgraph at ep_size 1; not with activation checkpointing); `auto` (`model` "
                          "on an accelerator, `blocks` there with activation checkpointing, `none` on CPU). "
                          "`true` means `blocks` (docs/performance.md)"),
    "RunConfig.precision": "DeepSpeed's bf16/fp16 modes; the router, softmax and aux losses stay fp32",
    "RunConfig.zero_stage": "ZeRO stage 0, 1 or 2; 3 is refused (DeepSpeed MoE does not partition experts)",
    "RunConfig.ep_size": ("expert-parallel ranks per expert group; must divide the world size and "
                          "model.moe.num_experts"),
    "RunConfig.grad_clip": "gradient clipping (global norm, DeepSpeed's definition); 0 disables. ZeRO-0 fp32 runs "
                           "clip in the trainer (a few foreach ops; DeepSpeed's gradient_clipping is then 0)",
    "DataSection.val": "shard spec of the evaluation split (eval.every / the final eval); empty: no eval",
    "DataSection.workers": ("DataLoader worker processes per rank (run at nice 10); exact mode needs "
                            "shards >= ranks x workers"),
    "DataSection.shuffle_buffer": "per-worker sample shuffle buffer (samples)",
    "DataSection.epoch_samples": ("resampled mode: samples per epoch over all ranks (0: the samples the spec "
                                  "holds)"),
    "DataSection.max_failure_fraction": ("stop the run when more than this share of the samples seen failed "
                                         "(checked after 64 samples)"),
    "DataSection.allow_pipe": ("allow `pipe:` shard URLs (they run a shell command); other URL schemes are "
                               "always refused"),
    "BatchSection.micro_batch": "samples per rank per forward",
    "BatchSection.grad_accum": "micro-batches per optimizer step",
    "OptimizerSection.lr": "peak AdamW learning rate",
    "OptimizerSection.weight_decay": "AdamW decay; none on norms, biases, embeddings, logit scale/bias",
    "OptimizerSection.betas": "AdamW (beta1, beta2)",
    "OptimizerSection.eps": "AdamW epsilon",
    "ScheduleSection.warmup_steps": "LR factor (step + 1) / warmup_steps for the first warmup_steps optimizer steps",
    "ScheduleSection.min_lr_ratio": "cosine decays to lr x min_lr_ratio at `steps`",
    "CheckpointSection.keep": "complete checkpoints of this run to keep (>= 2)",
    "LoggingSection.every": "optimizer steps between TensorBoard / metrics.jsonl records",
    "LoggingSection.tensorboard": "write <output_dir>/tensorboard (rank 0)",
    "LoggingSection.progress": "progress bar on rank 0",
    "DebugSection.nan_loss_rank": "the rank nan_loss_steps applies to",
    "DebugSection.raise_rank": "the rank raise_at_step applies to",
    "ModelConfig.name": "registry name; defaults to the JSON file's stem",
    "ModelConfig.kind": "two-tower MoE-CLIP, single-tower LIMoE (one shared transformer), or CoCa (two towers + a "
                        "multimodal text decoder: captioning, VQA; docs/captioning.md)",
    "ModelConfig.embed_dim": "width of the joint image-text embedding",
    "ModelConfig.moe": "MoEConfig fields except hidden_size / ffn_hidden_size (see the MoE layer table); "
                       "given in a JSON it replaces this default as a whole",
    "ModelConfig.loss": "contrastive loss: open_clip's ClipLoss or SigLipLoss, gathered over data-parallel ranks",
    "VisionConfig.image_size": "input resolution; must be divisible by patch_size",
    "VisionConfig.patch_size": "ViT patch size",
    "VisionConfig.width": "transformer width (LIMoE: must equal text.width)",
    "VisionConfig.layers": "transformer blocks",
    "VisionConfig.heads": "attention heads; must divide width",
    "VisionConfig.mlp_ratio": "MLP hidden = width x mlp_ratio (dense MLPs and experts)",
    "TextConfig.vocab_size": "token embedding rows; must cover the tokenizer's ids",
    "TextConfig.context_length": "tokens per caption including BOS and EOS (>= 2)",
    "TextConfig.width": "transformer width",
    "TextConfig.layers": "transformer blocks",
    "TextConfig.heads": "attention heads; must divide width",
    "TextConfig.mlp_ratio": "MLP hidden = width x mlp_ratio (dense MLPs and experts)",
    "TextConfig.pad_id": "padding token id",
    "TextConfig.eos_id": "end-of-text id (found by pool_type eos); positions after EOS route as padding",
    "MoEPlacement.every": "every n-th block, starting at block n-1 (0: none)",
    "MoEPlacement.blocks": "explicit block indices",
    "MoEPlacement.last": "the last k blocks",
    "MoEConfig.hidden_size": "the tower width (set by the model; not a model-JSON field)",
    "MoEConfig.ffn_hidden_size": "tower width x mlp_ratio (set by the model; not a model-JSON field)",
    "MoEConfig.num_experts": "E, experts per MoE layer (global, over all expert-parallel ranks)",
    "MoEConfig.top_k": "experts per token for router=topk",
    "MoEConfig.threshold": "router=threshold: gate probability an expert needs, in (0, 1]",
    "MoEConfig.top_p": "router=top_p: probability mass to cover, in (0, 1]",
    "MoEConfig.max_k": "most experts per token for threshold / top_p routers",
    "MoEConfig.router_noise_eps": "eps of the router noise",
    "MoEConfig.capacity_factor": "training capacity factor (see Capacity above)",
    "MoEConfig.eval_capacity_factor": "capacity factor in eval mode",
    "MoEConfig.min_capacity": "lower bound of the per-expert capacity",
    "MoEConfig.dropless": "no capacity: every assignment is computed",
    "MoEConfig.drop_priority": "which assignments survive when capacity binds",
    "MoEConfig.load_balance_coef": "Switch/GShard load-balance loss weight",
    "MoEConfig.z_loss_coef": "ST-MoE router z-loss weight",
    "MoEConfig.entropy_local_coef": "LIMoE local (per-token) entropy loss weight, per modality",
    "MoEConfig.entropy_global_coef": "LIMoE global (mean-gate) entropy loss weight, per modality",
    "MoEConfig.modality_experts": "(n_image_only, n_text_only[, n_cross_only]) reserved experts, in that order "
                                  "before the shared ones; cross: a CoCa decoder's tokens",
    "MoEConfig.activation": "expert activation",
    "MoEConfig.expert_bias": "experts have biases b1, b2",
    "MoEConfig.shared_expert": "add one always-on GELU FFN to the routed output (the older form of "
                               "num_shared_experts; not both)",
    "MoEConfig.num_shared_experts": "always-on experts with the routed experts' activation (DeepSeekMoE)",
    "MoEConfig.granularity": "fine-grained experts: each expert ffn_hidden_size / granularity wide",
    "MoEConfig.score_func": "gate scores: softmax over experts, or per-expert sigmoid (top-k only)",
    "MoEConfig.n_groups": "expert groups of group-limited routing (top-k; 1: none)",
    "MoEConfig.topk_groups": "groups a token may pick its experts from",
    "MoEConfig.router_bias": "auxiliary-loss-free balancing: a selection bias moved after each optimizer step",
    "MoEConfig.router_bias_rate": "the selection bias's step per optimizer step",
    "MoEConfig.slots_per_expert": "Soft MoE: slots per expert and sequence",
    "MoEConfig.load_balance": "tokens the balance loss's frequencies count: micro_batch, global_batch, sequence",
    "MoEPlacement.overrides": "MoEConfig fields for this tower's MoE layers over model.moe",
    "MoEConfig.shared_ffn_hidden_size": "hidden width of the shared expert",
    "MoEConfig.expert_backend": "grouped expert compute; auto picks per device and dtype",
    "MoEConfig.recompute_activation": "loop backend: keep only the pre-activation and recompute act(h) in "
                                      "backward (0.84x k dense FFNs' activation memory); false keeps act(h) "
                                      "too (1.29x) and saves one elementwise pass (the layer 2-3% faster, "
                                      "bench/moe_layer.py)",
}


@dataclasses.dataclass
class FieldDoc:
    """One row of a table: dotted key, type, default (JSON, which YAML reads), meaning."""

    key: str
    type: str
    default: str
    meaning: str


def field_comments(cls: type) -> Dict[str, str]:
    """Field name -> the ``# comment`` on its line in ``cls``'s source."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.end_lineno in comments:
                out[node.target.id] = comments[node.end_lineno]
    return out


def docstring_entries(cls: type) -> Dict[str, str]:
    """Field name -> its ``name: text`` entry in the class docstring (continuation lines joined)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out: Dict[str, str] = {}
    current, indent = None, 0
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        match = re.match(r"^(\s*)(\w+): (.+)$", line)
        if match and match.group(2) in names:
            current, indent = match.group(2), len(match.group(1))
            out[current] = match.group(3).strip()
        elif current and line.strip() and len(line) - len(line.lstrip()) > indent:
            out[current] += " " + line.strip()
        else:
            current = None
    return out


def choices(cls: type) -> Dict[str, Tuple[str, ...]]:
    """Field name -> the valid values, read from the registries and tuples the validators use."""
    from .engine.config import PRECISIONS, RunConfig, ScheduleSection
    from .models.config import KINDS, ModelConfig
    from .models.loss import CONTRASTIVE_LOSSES
    from .moe.config import VARIANT_FIELDS, MoEConfig

    if cls is MoEConfig:
        return {name: tuple(registry) for name, registry in VARIANT_FIELDS.items()}
    if cls is ModelConfig:
        return {"kind": KINDS, "loss": tuple(sorted(CONTRASTIVE_LOSSES))}
    if cls is RunConfig:
        return {"precision": PRECISIONS}
    if cls is ScheduleSection:
        return {"kind": ("cosine", "constant")}
    return {}


def _type_name(hint: Any) -> str:
    text = str(hint) if not isinstance(hint, type) else hint.__name__
    return text.replace("typing.", "")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def walk(cls: type, prefix: str, skip: Tuple[str, ...] = ()) -> Iterator[Tuple[str, type, List[FieldDoc]]]:
    """(section key, class, rows) for ``cls`` and, after it, each nested dataclass section."""
    hints = typing.get_type_hints(cls)
    comments, entries, valid = field_comments(cls), docstring_entries(cls), choices(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            nested.append((f"{prefix}{f.name}.", hints[f.name]))
            continue
        meaning = comments.get(f.name) or entries.get(f.name) or NOTES.get(f"{cls.__name__}.{f.name}", "")
        meaning = meaning.replace("``", "`").rstrip(".")
        if f.name in valid:
            meaning += ("; " if meaning else "") + "one of " + ", ".join(f"`{v}`" for v in valid[f.name])
        rows.append(FieldDoc(prefix + f.name, _type_name(hints[f.name]), _default(f), meaning))
    yield prefix.rstrip("."), cls, rows
    for sub_prefix, sub in nested:
        yield from walk(sub, sub_prefix)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _table(rows: List[FieldDoc]) -> List[str]:
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r.key}` | `{_escape(r.type)}` | `{_escape(r.default)}` | {_escape(r.meaning)} |")
    return lines


def _sections(cls: type, prefix: str, heading: str, skip: Tuple[str, ...] = ()) -> List[str]:
    lines = []
    for key, sub, rows in walk(cls, prefix, skip):
        if not rows:
            continue
        lines += ["", f"{heading} `{key or 'top level'}` ({sub.__name__})", ""]
        doc = inspect.getdoc(sub)
        if doc and sub.__name__ != "MoEConfig" and not doc.startswith(sub.__name__ + "("):
            lines += [" ".join(doc.split()).replace("``", "`"), ""]
        lines += _table(rows)
    return lines


def shipped_models() -> List[str]:
    """Model JSON names in the source tree's configs/models (the registry's built-in entries)."""
    directory = Path(__file__).resolve().parents[1] / "configs" / "models"
    return sorted(p.stem for p in directory.glob("*.json"))


COMPOSITION = """\
## How a run config is composed

1. **Dataclass defaults** (the tables below).
2. **The YAML file** (`moe-dist train --config RUN.yaml`): nested mappings named like the sections.
   A key given twice, an unknown key, or a value of the wrong type is an error naming the field;
   keys starting with `_` are comments.
3. **`--set a.b=c`** (repeatable), merged over the YAML; the value is parsed as YAML, so
   `--set ep_size=2` is an int and `--set eval.tasks=[loss,retrieval]` a list.
4. **The model**: `model.name` picks a JSON (a registry name from `configs/models/`, a file in
   `$MOE_DIST_CONFIG_DIR/models`, or a path ending in `.json`), or `open_clip:ARCH` maps open_clip's
   architecture `ARCH` onto it (docs/interop.md). Any key under `model` other than
   {model_section} is moved into `model.overrides`, so `--set model.moe.top_k=2` and
   `model: {overrides: {moe: {top_k: 2}}}` are the same. The overrides are merged into the JSON
   (nested mappings merge key by key; a list or scalar replaces) and the result is validated as a
   `ModelConfig`.
5. **Validation** (`RunConfig.validate(world_size)`, `check_inputs`) before any process group starts:
   ranges, `ep_size` divides the world size and `model.moe.num_experts`, `batch.global_batch`
   (if set) equals micro_batch x grad_accum x world size, and every shard spec, the tokenizer,
   `eval.classes` and the resume path resolve.

The DeepSpeed config is generated from the run config (`RunConfig.deepspeed_config`): batch sizes,
`gradient_clipping` (0 for ZeRO-0 fp32, whose trainer clips with `engine.optim.clip_grad_norm`: the
same norm as DeepSpeed's per-parameter loop, in a few foreach ops), `zero_optimization.stage`, ZeRO's
`reduce_bucket_size`/`allgather_bucket_size` (the model's parameter count, at most DeepSpeed's 5e8),
`bf16`/`fp16` (fp16 with `initial_scale_power` 12).
Both are saved with the run and in every checkpoint (`run_config.json`).

`moe-dist params --model NAME --set moe.top_k=2` takes model fields directly (a leading `model.` is
dropped). Model JSONs hold `ModelConfig` fields; `moe` holds `MoEConfig` fields, whose
`hidden_size`/`ffn_hidden_size` come from the tower (width, and width x mlp_ratio).
"""


def composition() -> str:
    """COMPOSITION with the run config's own ``model`` fields (``ModelSection``) filled in."""
    from .engine.config import ModelSection

    names = [f"`{f.name}`" for f in dataclasses.fields(ModelSection)]
    listed = " and ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " and " + names[-1]
    return COMPOSITION.rstrip().replace("{model_section}", listed)


def render() -> str:
    """The whole of docs/configuration.md."""
    from .engine.config import RunConfig
    from .models.config import ModelConfig
    from .moe.config import MoEConfig

    moe_doc = inspect.getdoc(MoEConfig) or ""
    lines = ["# Configuration reference", "",
             "<!-- Generated by `python -m moe_dist.config_docs > docs/configuration.md`; do not edit by hand. -->",
             "", "Every field of the run config, the model config and the MoE layer config: type, default "
             "(as JSON, which YAML reads) and meaning, read from the dataclasses in "
             "`moe_dist/engine/config.py`, `moe_dist/models/config.py` and `moe_dist/moe/config.py`.",
             "", composition(), "", "## Run config (`RunConfig`)"]
    lines += _sections(RunConfig, "", "###", skip=())
    lines += ["", "## Model config (`ModelConfig`, a model JSON; `model.*` in a run config)", "",
              "Shipped models (`configs/models/`): " + ", ".join(f"`{m}`" for m in shipped_models()) + "."]
    lines += _sections(ModelConfig, "model.", "###")
    lines += ["", "## MoE layer (`MoEConfig`, `model.moe.*`)", "", "```", moe_doc, "```", ""]
    rows = next(walk(MoEConfig, "model.moe."))[2]
    lines += _table(rows)
    lines += ["", "`hidden_size` and `ffn_hidden_size` are set from the tower width; `num_experts` has no "
              "default in `MoEConfig`, and a model JSON without `moe` gets `ModelConfig.moe`'s default."]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Print the reference; anything the imports log (DeepSpeed logs to stdout) goes to stderr instead."""
    with contextlib.redirect_stdout(sys.stderr):
        text = render()
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
