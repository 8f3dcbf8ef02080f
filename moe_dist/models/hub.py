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
run directory (``<run>/checkpoints/step########``). An export file has no run: the card says so.

``push_folder`` uploads the folder with ``huggingface_hub`` when it is installed and a token is set
(``HF_TOKEN`` or ``hf auth login``); the token is never printed, and is masked in any error that is.
"""

from __future__ import annotations

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
    """What the run that wrote a checkpoint recorded (empty when the source is not a run's checkpoint).

    Attributes:
        run_config: the run's resolved config (run_config.json), or None.
        metrics: the records of its metrics.jsonl, oldest first.
        metrics_path: where they were read ("" when none).
    """

    run_config: Optional[dict] = None
    metrics: List[dict] = field(default_factory=list)
    metrics_path: str = ""

    @classmethod
    def find(cls, source: str) -> "RunRecord":
        """The record of the run whose checkpoint ``source`` is (a step directory); unreadable parts are left out."""
        if not os.path.isdir(source):
            return cls()
        record = cls()
        try:
            with open(os.path.join(source, "run_config.json")) as f:
                record.run_config = json.load(f)
        except (OSError, ValueError):
            pass
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(source))), "metrics.jsonl")
        try:
            with open(path) as f:
                for line in f:
                    try:
                        record.metrics.append(json.loads(line))
                    except ValueError:
                        continue  # a line cut by a crash
            record.metrics_path = path
        except OSError:
            pass
        return record

    def last(self, prefix: str, step: Optional[int] = None) -> Dict[str, object]:
        """The newest record (at or before ``step``) holding keys that start with ``prefix``: {"step", key: value}."""
        for rec in reversed(self.metrics):
            if step is not None and isinstance(rec.get("step"), int) and rec["step"] > step:
                continue
            found = {k: v for k, v in rec.items() if k.startswith(prefix)}
            if found:
                return {"step": rec.get("step"), **found}
        return {}


def param_counts(config: ModelConfig) -> Dict[str, int]:
    """total, expert, active and active/<modality> parameters of ``config`` (``params.count_params``)."""
    from .build import build_model
    from .params import count_params

    with torch.device("meta"):
        return count_params(build_model(config), config)


def write_hub(state: PretrainedState, out_dir: str, dtype: str = "fp32") -> None:
    """The Hub folder of ``state`` (module docstring) at ``out_dir`` (a new or empty directory), atomically."""
    params = param_counts(state.config)
    with atomic_dir(out_dir) as tmp:
        write_export(state, os.path.join(tmp, HUB_WEIGHTS_FILE), dtype)
        for name, data in model_files(state.config, state.tokenizer).items():
            if isinstance(data, bytes):  # the tokenizer; the model config goes into config.json
                atomic_write(os.path.join(tmp, name), data, durable=False)
        atomic_json(os.path.join(tmp, HUB_CONFIG_FILE), {
            "format": HUB_FORMAT, "model_config": portable_config(state.config, state.tokenizer), "dtype": dtype,
            "step": state.step, "source": state.source, "params": params}, durable=False)
        atomic_write(os.path.join(tmp, README_FILE), model_card(state, RunRecord.find(state.source), params, dtype),
                     durable=False)


# ---------------------------------------------------------------------------------------------- the card
def model_card(state: PretrainedState, run: RunRecord, params: Dict[str, int], dtype: str) -> str:
    """README.md of a Hub folder: YAML front matter (licence left empty) and the sections of the module docstring."""
    cfg = state.config
    kind = {"clip": "two-tower CLIP", "limoe": "one-tower LIMoE", "coca": "CoCa (two towers + caption decoder)"}
    step = "unknown" if state.step is None else str(state.step)
    lines = ["---", "library_name: moe_dist", "license:  # fill in the licence of the weights (e.g. apache-2.0)",
             f"tags: [moe_dist, {cfg.kind}, {'mixture-of-experts' if cfg.tower_moe() else 'dense'}]", "---", "",
             f"# {cfg.name}", "",
             f"A {kind.get(cfg.kind, cfg.kind)} model trained with moe_dist, exported at step {step} in {dtype} "
             f"from `{state.source}`.", "", "```python", "from moe_dist.models import load_pretrained", "",
             'model, tokenizer = load_pretrained("THIS_FOLDER")  # or a local clone of the Hub repo', "```", ""]
    lines += _architecture(cfg) + _parameters(params) + _training(run, state.step)
    lines += _metrics(run.last("val/", state.step), "Last evaluation", "no evaluation was recorded")
    lines += _routing(run.last("moe/", state.step))
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
    from ..data.urls import shown_spec

    out = ["## Training", ""]
    if run.run_config is None:
        return out + ["The run that trained this model was not recorded beside the checkpoint.", ""]
    data, rc = run.run_config.get("data") or {}, run.run_config
    model = rc.get("model") or {}
    out += [f"- data: train `{shown_spec(str(data.get('train', '')))}`"
            + (f", validation `{shown_spec(str(data['val']))}`" if data.get("val") else ""),
            f"- steps: {step if step is not None else '?'} of {rc.get('steps', '?')} planned; "
            f"seed {rc.get('seed', '?')}",
            f"- model config: `{model.get('name', '?')}`" + (f" with overrides `{json.dumps(model['overrides'])}`"
                                                              if model.get("overrides") else ""), ""]
    return out


def _metrics(record: Dict[str, object], title: str, missing: str) -> List[str]:
    out = [f"## {title}", ""]
    if not record:
        return out + [f"None: {missing}.", ""]
    out += [f"At step {record.get('step')}:", "", "| metric | value |", "|---|---|"]
    out += [f"| {k} | {_number(v)} |" for k, v in record.items() if k != "step"]
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
            "| layer | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    out += [f"| {layer} | " + " | ".join(_number(row.get(c, "")) for c in columns) + " |"
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
