"""A Hub folder for any of our models, MoE included (``moe-dist export --format hub --out DIR [--push REPO]``).

    config.json        {"format": "moe_dist.hub/1", "model_config": the ModelConfig, "dtype", "step",
                       "source", "params": total/expert/active counts}; ``load_pretrained(DIR)`` builds the
                       model from it and refuses tensors that disagree with it
    model.safetensors  an export file (``pretrained.py``: every expert, loads on its own too)
    tokenizer.model    the sentencepiece model (absent for openclip-bpe, which ships with open_clip)
    README.md          a model card generated from the run: architecture, parameters (total and active per
                       token), the data spec names, steps, the last eval metrics and the training-time routing
                       summary of metrics.jsonl; its ``license`` is left for the user to fill in

The run is found from the checkpoint: a step directory's ``run_config.json``, and ``metrics.jsonl`` in the
run directory (its ``output_dir``, or ``<run>`` of ``<run>/checkpoints/step########``). An export file or a Hub
folder has no run: the card says so. The source is named relative to the run directory (or by its base name),
``pipe:`` data sources are hidden, and table cells are escaped.

``push_folder`` uploads the folder with ``huggingface_hub`` when it is installed and a token is set
(``HF_TOKEN`` or ``hf auth login``); the token is never printed, and is masked in any error that is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..files import atomic_dir, atomic_json, atomic_write
from .config import HUB_CONFIG_FILE, HUB_FORMAT, HUB_WEIGHTS_FILE, ModelConfig
from .pretrained import PretrainedState, model_files, portable_config, write_export

README_FILE = "README.md"


@dataclass
class RunRecord:
    """What the run that wrote a checkpoint recorded (empty when the source is not a trainer's checkpoint).

    Attributes:
        run_config: the run's resolved config (run_config.json of the step directory), or None.
        latest: prefix ("val/", "moe/") -> the newest metrics.jsonl record at or before the step holding keys
            with that prefix, as {"step", key: value}.
        run_dir: the run directory (where metrics.jsonl is; "" when unknown).
    """

    run_config: Optional[dict] = None
    latest: Dict[str, Dict[str, object]] = field(default_factory=dict)
    run_dir: str = ""

    @classmethod
    def find(cls, source: str, step: Optional[int] = None, prefixes=("val/", "moe/")) -> "RunRecord":
        """The record of the run whose step directory ``source`` is: only a directory holding the trainer's
        run_config.json (a Hub folder or an export has none, and takes no other run's metrics). The run
        directory is its ``output_dir`` when absolute, else ``<run>`` of ``<run>/checkpoints/step########``.
        metrics.jsonl is streamed (a line at a time); unreadable parts are left out."""
        if not os.path.isdir(source):
            return cls()
        try:
            with open(os.path.join(source, "run_config.json")) as f:
                run_config = json.load(f)
        except (OSError, ValueError):
            return cls()
        if not isinstance(run_config, dict):
            return cls()
        out = run_config.get("output_dir")
        run_dir = out if isinstance(out, str) and os.path.isabs(out) and os.path.isdir(out) else \
            os.path.dirname(os.path.dirname(os.path.abspath(source)))
        record = cls(run_config, {}, run_dir)
        try:
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                for line in f:
                    record._take(line, step, prefixes)
        except OSError:
            pass
        return record

    def _take(self, line: str, step: Optional[int], prefixes) -> None:
        try:
            rec = json.loads(line)
        except ValueError:
            return  # a line cut by a crash
        if not isinstance(rec, dict) or (step is not None and isinstance(rec.get("step"), int) and rec["step"] > step):
            return
        for prefix in prefixes:
            found = {k: v for k, v in rec.items() if k.startswith(prefix)}
            if found:
                self.latest[prefix] = {"step": rec.get("step"), **found}

    def last(self, prefix: str) -> Dict[str, object]:
        """The newest record (at or before the step ``find`` was given) with keys starting with ``prefix``."""
        return self.latest.get(prefix, {})


def param_counts(config: ModelConfig) -> Dict[str, int]:
    """total, expert, active and active/<modality> parameters of ``config`` (``params.count_params``)."""
    from .build import build_model
    from .params import count_params

    with torch.device("meta"):
        return count_params(build_model(config), config)


def write_hub(state: PretrainedState, out_dir: str, dtype: str = "fp32") -> None:
    """The Hub folder of ``state`` (module docstring) at ``out_dir`` (a new or empty directory), atomically."""
    params = param_counts(state.config)
    run = RunRecord.find(state.source, state.step)
    state = dataclasses.replace(state, source=shown_source(state.source, run.run_dir))  # no absolute path leaves
    with atomic_dir(out_dir) as tmp:
        write_export(state, os.path.join(tmp, HUB_WEIGHTS_FILE), dtype)
        for name, data in model_files(state.config, state.tokenizer).items():
            if isinstance(data, bytes):  # the tokenizer; the model config goes into config.json
                atomic_write(os.path.join(tmp, name), data, durable=False)
        atomic_json(os.path.join(tmp, HUB_CONFIG_FILE), {
            "format": HUB_FORMAT, "model_config": portable_config(state.config, state.tokenizer), "dtype": dtype,
            "step": state.step, "source": state.source, "params": params}, durable=False)
        atomic_write(os.path.join(tmp, README_FILE), model_card(state, run, params, dtype),
                     durable=False)


def shown_source(source: str, run_dir: str) -> str:
    """How the folder names its source: the path relative to the run directory when it is inside it
    (checkpoints/step00000007), else the base name; never an absolute path (a user name, a mount)."""
    path = os.path.abspath(source)
    if run_dir and path.startswith(os.path.abspath(run_dir) + os.sep):
        return os.path.relpath(path, run_dir)
    return os.path.basename(os.path.normpath(source)) or source


# ---------------------------------------------------------------------------------------------- the card
def _cell(value: object) -> str:
    """A Markdown table cell: no newline, and | and ` escaped."""
    return " ".join(str(value).split()).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")


def _code(value: object) -> str:
    """Text for an inline code span: on one line, with no backtick to end it early."""
    return " ".join(str(value).split()).replace("`", "'")


def _card_spec(spec: str) -> str:
    """A data spec for the card: URLs shown by ``shown_spec`` (no query, no credentials), pipe: commands hidden."""
    from ..data.urls import shown_spec

    return "::".join("pipe:<command hidden>" if part.strip().startswith("pipe:") else shown_spec(part)
                     for part in spec.split("::"))


def model_card(state: PretrainedState, run: RunRecord, params: Dict[str, int], dtype: str) -> str:
    """README.md of a Hub folder: YAML front matter (licence left empty) and the sections of the module docstring."""
    cfg = state.config
    kind = {"clip": "two-tower CLIP", "limoe": "one-tower LIMoE", "coca": "CoCa (two towers + caption decoder)"}
    step = "unknown" if state.step is None else str(state.step)
    lines = ["---", "library_name: moe_dist", "license:  # fill in the licence of the weights (e.g. apache-2.0)",
             f"tags: [moe_dist, {cfg.kind}, {'mixture-of-experts' if cfg.tower_moe() else 'dense'}]", "---", "",
             f"# {_code(cfg.name)}", "",
             f"A {kind.get(cfg.kind, cfg.kind)} model trained with moe_dist, exported at step {step} in {dtype} "
             f"from `{_code(state.source)}`.", "", "```python", "from moe_dist.models import load_pretrained", "",
             'model, tokenizer = load_pretrained("THIS_FOLDER")  # or a local clone of the Hub repo', "```", ""]
    lines += _architecture(cfg) + _parameters(params) + _training(run, state.step)
    lines += _metrics(run.last("val/"), "Last evaluation", "no evaluation was recorded")
    lines += _routing(run.last("moe/"))
    lines += ["## Licence", "", "Not set by the export: fill in `license:` at the top of this file.", ""]
    return "\n".join(lines)


def _architecture(cfg: ModelConfig) -> List[str]:
    v, t = cfg.vision, cfg.text
    rows = [("image tower", v.width, v.layers, v.heads, v.mlp_ratio, cfg.vision_moe_blocks()),
            ("text tower", t.width, t.layers, t.heads, t.mlp_ratio,
             [] if cfg.kind == "limoe" else cfg.text_moe_blocks())]
    if cfg.kind == "coca":
        blocks = cfg.decoder_moe_blocks()
        rows.append(("decoder", t.width, cfg.decoder.layers, cfg.decoder.heads or t.heads, cfg.decoder.mlp_ratio,
                     sorted(set(blocks["decoder"]) | set(blocks["decoder_cross"]))))
    out = ["## Architecture", "",
           f"Embedding {cfg.embed_dim}; images {v.image_size}px in {v.patch_size}px patches; text up to "
           f"{t.context_length} tokens (vocabulary {t.vocab_size}, tokenizer `{t.tokenizer}`, pooled by "
           f"{t.pool_type}); loss {cfg.loss}.", "",
           "| part | width | layers | heads | MLP ratio | MoE blocks |", "|---|---|---|---|---|---|"]
    out += [f"| {name} | {w} | {layers} | {heads} | {ratio:g} | {', '.join(map(str, moe)) or 'none'} |"
            for name, w, layers, heads, ratio, moe in rows]
    for tower, moe in cfg.tower_moe().items():
        out.append(f"\n{tower} MoE layers: {moe.num_experts} experts, router `{moe.router}` (top_k {moe.top_k}), "
                   f"capacity factor {moe.capacity_factor:g}{' (dropless)' if moe.dropless else ''}.")
    return out + [""]


def _parameters(params: Dict[str, int]) -> List[str]:
    out = ["## Parameters", "", "| | parameters |", "|---|---|"]
    names = {"total": "total", "expert": "in experts", "active": "active per token",
             "active/image": "active per image token", "active/text": "active per text token"}
    out += [f"| {names.get(k, k)} | {v:,} |" for k, v in params.items()]
    return out + [""]


def _training(run: RunRecord, step: Optional[int]) -> List[str]:
    out = ["## Training", ""]
    if run.run_config is None:
        return out + ["The run that trained this model was not recorded beside the checkpoint.", ""]
    data, rc = run.run_config.get("data") or {}, run.run_config
    model = rc.get("model") or {}
    out += [f"- data: train `{_code(_card_spec(str(data.get('train', ''))))}`"
            + (f", validation `{_code(_card_spec(str(data['val'])))}`" if data.get("val") else ""),
            f"- steps: {step if step is not None else '?'} of {rc.get('steps', '?')} planned; "
            f"seed {rc.get('seed', '?')}",
            f"- model config: `{_code(model.get('name', '?'))}`"
            + (f" with overrides `{_code(json.dumps(model['overrides']))}`" if model.get("overrides") else ""), ""]
    return out


def _metrics(record: Dict[str, object], title: str, missing: str) -> List[str]:
    out = [f"## {title}", ""]
    if not record:
        return out + [f"None: {missing}.", ""]
    out += [f"At step {record.get('step')}:", "", "| metric | value |", "|---|---|"]
    out += [f"| {_cell(k)} | {_cell(_number(v))} |" for k, v in record.items() if k != "step"]
    return out + [""]


def _routing(record: Dict[str, object]) -> List[str]:
    out = ["## Routing", ""]
    if not record:
        return out + ["No routing statistics were recorded (a dense model, or no metrics.jsonl). "
                      "`moe-dist analyze-routing` measures them on any data.", ""]
    table: Dict[str, Dict[str, object]] = {}
    for key, value in record.items():
        parts = key.split("/")  # moe/<stat>/<layer>, or moe/<stat>/<modality>/<layer> (left out: one row per layer)
        if len(parts) == 3:
            table.setdefault(parts[2], {})[parts[1]] = value
    columns = sorted({c for row in table.values() for c in row})
    out += [f"From training at step {record.get('step')} (metrics.jsonl; load_max_over_mean 1 = balanced):", "",
            "| layer | " + " | ".join(map(_cell, columns)) + " |", "|---" * (len(columns) + 1) + "|"]
    out += [f"| {_cell(layer)} | " + " | ".join(_cell(_number(row.get(c, ""))) for c in columns) + " |"
            for layer, row in sorted(table.items())]
    return out + [""]


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------- pushing
def push_folder(folder: str, repo: str) -> str:
    """Upload ``folder`` to the Hub model repo ``repo`` (created private when missing); returns its URL.

    Raises ValueError (one line, never the token) when huggingface_hub is missing, no token is set, or the
    upload fails."""
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError(f"--push needs huggingface_hub: pip install huggingface_hub, then push {folder} with "
                         f"`hf upload {repo} {folder}`") from None
    token = huggingface_hub.get_token()
    if not token:
        raise ValueError(f"--push {repo} needs a Hugging Face token: set HF_TOKEN or run `hf auth login`, then push "
                         f"{folder} with `hf upload {repo} {folder}` (the folder is written)")
    try:
        api = huggingface_hub.HfApi(token=token)
        api.create_repo(repo, repo_type="model", private=True, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo, repo_type="model",
                                 commit_message="moe-dist export --format hub")
        return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo}")
    except Exception as err:  # any network, auth or offline error: one line, token masked
        reason = " ".join(str(err).replace(token, "***").split())[:300]  # masked before the cut: no prefix shows
        raise ValueError(f"--push {repo} failed ({type(err).__name__}: {reason}); the folder {folder} is written, "
                         f"push it later with `hf upload {repo} {folder}`") from None
