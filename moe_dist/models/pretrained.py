"""A trained model on its own: any checkpoint (or export) into a plain ``nn.Module`` on one process, and
an export to one safetensors file.

``path`` takes four forms everywhere (``load_pretrained``, ``consolidated_state_dict``, ``export``, and
``moe-dist export/reshard --checkpoint``): a run's checkpoint root (its newest complete checkpoint), one
``step########`` directory, a ``.safetensors`` file written by ``export``, or a Hub folder written by
``moe-dist export --format hub`` (``config.json`` with format "moe_dist.hub/1", its ModelConfig and the
run's record; ``model.safetensors``, an export file; ``tokenizer.model`` for sentencepiece; README.md):
``config.json`` gives the model, and tensors that disagree with it are refused, naming the first one.

A checkpoint directory carries ``model_config.json`` (the resolved ModelConfig; its ``text.tokenizer``
is "sentencepiece:tokenizer.model", relative to the directory, or "openclip-bpe") and ``tokenizer.model``.
Its weights are DeepSpeed's model files, one per *global* expert (``moe_dist.checkpoint_files``), so the
world size, ep_size and ZeRO stage that wrote it do not matter: they are gathered here, without
``deepspeed.initialize``. Only weights-only loads with the allow-list unpickle anything.

Export format (version ``moe_dist.export/1``), one file that stands alone:
    tensors   the ep_size=1 state dict, i.e. what ``model.state_dict()`` of an ep_size=1 model returns:
              non-expert weights under their module names, experts under DeepSpeed's per-expert keys
              with global ids (``...deepspeed_experts.<E>.w1`` [D, H], ``.b1`` [H], ``.w2`` [H, D], ``.b2`` [D])
    metadata  format="moe_dist.export/1"; model_config=<ModelConfig JSON>; tokenizer="sentencepiece" with
              tokenizer_model=<the .model file, base64> embedded, or tokenizer="openclip-bpe" (its vocabulary
              ships with open_clip); dtype ("fp32"/"bf16"); step; source (the checkpoint it came from)

Precision: under bf16, DeepSpeed keeps fp32 master weights in the ZeRO optimizer shards and bf16 weights
in the model files. We load the model files, i.e. the bf16 weights the run computed with; ``dtype``
casts them (fp32 gives the same values, widened).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch

from ..checkpoint_files import (EXPERT_STATES_RE, MAX_METADATA_BYTES, MODEL_STATES, TAG_RE, find_checkpoint,
                                load_weights_only, read_json, read_marker, verify_files)
from ..files import read_small
from ..config import from_dict
from ..files import atomic_path
from ..text.tokenizer import MAX_TOKENIZER_BYTES, SentencePieceTokenizer, get_tokenizer, sentencepiece_path
from .build import build_model
from .config import (HUB_CONFIG_FILE, HUB_FORMAT, HUB_WEIGHTS_FILE, MODEL_CONFIG_FILE, TOKENIZER_FILE, ModelConfig,
                     load_model_config)

EXPORT_FORMAT = "moe_dist.export/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPENCLIP_BPE = "openclip-bpe"
_EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\.\w+)$")  # (layer prefix, global id, tensor name)

TokenizerSpec = Union[bytes, str]  # a sentencepiece model's bytes, or "openclip-bpe"
ConfigArg = Union[ModelConfig, str, None]  # a ModelConfig, a registry name or a model JSON path


@dataclass
class PretrainedState:
    """A checkpoint's model in the layout of one process (ep_size=1).

    Attributes:
        config: the resolved ModelConfig.
        state_dict: name -> tensor, what ``model.state_dict()`` of an ep_size=1 model holds (experts under
            DeepSpeed's per-expert keys with global ids).
        tokenizer: the sentencepiece model's bytes, or "openclip-bpe".
        source: the step directory or export file that was read.
        step: the training step it was saved at (None when unknown).
    """

    config: ModelConfig
    state_dict: Dict[str, torch.Tensor]
    tokenizer: TokenizerSpec
    source: str
    step: Optional[int] = None

    def make_tokenizer(self):
        """The tokenizer, refused (ValueError) when it does not fit the model: more tokens than
        ``text.vocab_size``, or another EOS id where the text tower pools at EOS."""
        t = self.config.text
        if isinstance(self.tokenizer, bytes):
            try:
                tok = SentencePieceTokenizer(self.tokenizer, t.context_length)
            except (RuntimeError, OSError) as err:
                raise ValueError(f"{self.source}: the tokenizer is not a sentencepiece model "
                                 f"({str(err).splitlines()[0][:200]})") from None
        else:
            tok = get_tokenizer(self.tokenizer, t.context_length)
        if tok.vocab_size > t.vocab_size:
            raise ValueError(f"{self.source}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                             f"{t.vocab_size}; use the tokenizer the model was trained with")
        if t.pool_type == "eos" and tok.eos_id != t.eos_id:
            raise ValueError(f"{self.source}: the tokenizer's EOS id is {tok.eos_id} but the model pools at "
                             f"eos_id={t.eos_id}; use the tokenizer the model was trained with")
        return tok


def consolidated_state_dict(path: str, model_config: ConfigArg = None, tokenizer: Optional[str] = None,
                            kind: Optional[str] = None) -> PretrainedState:
    """Read a checkpoint (root, step directory) or export into the ep_size=1 layout, and check it.

    Args:
        path: a run's checkpoint root, one step directory, an exported .safetensors file, or a Hub folder.
        model_config: use this model config instead of the one the checkpoint carries (needed for
            checkpoints written before they carried ``model_config.json``).
        tokenizer: use this tokenizer ("sentencepiece:<path>", a .model path, "openclip-bpe") instead;
            a relative path is taken from the working directory.
        kind: the model kind the caller expects ("clip", "limoe"); another kind is refused.

    Returns:
        PretrainedState. Raises ValueError (one line) for a path without a complete checkpoint, a file
        that is not a moe_dist export, a missing model config, another kind than ``kind``, tensors whose
        names or shapes do not match the config, or a tokenizer that does not fit the model.
    """
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, HUB_CONFIG_FILE)):
        state = _read_export(os.path.abspath(path)) if os.path.isfile(path) else _read_hub(os.path.abspath(path))
        if model_config is not None:
            state.config = _as_config(model_config)
        if tokenizer is not None:
            state.tokenizer = _tokenizer_spec(tokenizer, os.getcwd(), "--tokenizer")
    else:
        state = _read_checkpoint(find_checkpoint(path), model_config, tokenizer)
    if kind is not None and state.config.kind != kind:
        raise ValueError(f"{state.source} holds a {state.config.kind!r} model ({state.config.name}), not the {kind!r} "
                         "model expected here")
    _check_matches(state.config, state.state_dict, state.source)
    state.make_tokenizer()
    return state


def load_pretrained(path: str, ep_size: int = 1, dtype: Union[str, torch.dtype, None] = None, device=None,
                    kind: Optional[str] = None, model_config: ConfigArg = None, tokenizer: Optional[str] = None):
    """A checkpoint written under any world size, ep_size, ZeRO stage 0/1/2 and precision, or an export,
    as a plain ``nn.Module`` in eval mode, plus its tokenizer.

    Args:
        path: a run's checkpoint root (newest complete checkpoint), one step directory, or an export.
        ep_size: 1 (all experts, no process group needed) or the expert-parallel size of a caller that
            has started torch.distributed: each rank then holds only its experts.
        dtype: torch.float32 / torch.bfloat16 / "fp32" / "bf16"; None keeps the dtype the weights were
            saved in (bf16 for a bf16 run: see the module docstring).
        device: where to put the model (default CPU).
        kind, model_config, tokenizer: as in ``consolidated_state_dict``.

    Returns:
        (model, tokenizer): the model's ``cfg`` is the checkpoint's ModelConfig; use the tokenizer
        returned here (the config's ``text.tokenizer`` names a file relative to the checkpoint).
    """
    state = consolidated_state_dict(path, model_config, tokenizer, kind)
    model = build_model(state.config, ep_size=ep_size)
    weights = state.state_dict if ep_size == 1 else _local_experts(state.state_dict, _expert_rank(ep_size), ep_size)
    model.load_state_dict(weights)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    model.to(device=device, dtype=dtype or _saved_dtype(weights))
    return model.eval(), state.make_tokenizer()


def export(checkpoint_path: str, out_file: str, dtype: str = "fp32", model_config: ConfigArg = None,
           tokenizer: Optional[str] = None) -> PretrainedState:
    """Write one safetensors file with every expert, the model config and the tokenizer embedded
    (format in the module docstring), atomically: a crash leaves no partial ``out_file``.

    Args:
        checkpoint_path: any of the three forms (an export converts to another dtype).
        out_file: the .safetensors file to write (its directory is created).
        dtype: "fp32" or "bf16" (half the size) for the floating-point tensors.
        model_config, tokenizer: as in ``consolidated_state_dict``.

    Returns:
        The state that was read (before the dtype cast).
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; use one of {sorted(DTYPES)}")
    state = consolidated_state_dict(checkpoint_path, model_config, tokenizer)
    write_export(state, out_file, dtype)
    return state


def write_export(state: PretrainedState, out_file: str, dtype: str = "fp32") -> None:
    """``state`` as one export file (format in the module docstring), written atomically."""
    from safetensors.torch import save_file

    metadata = {"format": EXPORT_FORMAT, "model_config": json.dumps(portable_config(state.config, state.tokenizer)),
                "dtype": dtype, "step": "" if state.step is None else str(state.step), "source": state.source}
    if isinstance(state.tokenizer, bytes):
        metadata.update(tokenizer="sentencepiece", tokenizer_model=base64.b64encode(state.tokenizer).decode("ascii"))
    else:
        metadata["tokenizer"] = state.tokenizer
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    with atomic_path(out_file) as tmp:
        save_file(file_tensors(state.state_dict, dtype), tmp, metadata=metadata)


def file_tensors(state_dict: Dict[str, torch.Tensor], dtype: str) -> Dict[str, torch.Tensor]:
    """``state_dict`` ready for a file: floating-point tensors cast to ``dtype`` ("fp32"/"bf16"; a router's
    selection bias stays fp32), each contiguous and in its own storage (safetensors stores no shared views)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; use one of {sorted(DTYPES)}")
    tensors, storages = {}, set()
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not name.endswith("selection_bias_ME"):  # the bias stays fp32
            tensor = tensor.to(DTYPES[dtype])
        if tensor.untyped_storage().data_ptr() in storages or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors


def portable_config(config: ModelConfig, tokenizer: TokenizerSpec) -> dict:
    """``config`` as a JSON-able dict whose ``text.tokenizer`` names the copy a checkpoint carries."""
    data = dataclasses.asdict(config)
    data["text"]["tokenizer"] = f"sentencepiece:{TOKENIZER_FILE}" if isinstance(tokenizer, bytes) else tokenizer
    return data


def model_files(config: ModelConfig, tokenizer: TokenizerSpec) -> Dict[str, Union[str, bytes]]:
    """What a checkpoint directory carries to stand alone: file name -> text or bytes."""
    files: Dict[str, Union[str, bytes]] = {MODEL_CONFIG_FILE: json.dumps(portable_config(config, tokenizer), indent=2)}
    if isinstance(tokenizer, bytes):
        files[TOKENIZER_FILE] = tokenizer
    return files


# ---------------------------------------------------------------------------------------------- reading
def _read_checkpoint(step_dir: str, model_config: ConfigArg, tokenizer: Optional[str]) -> PretrainedState:
    """The non-expert file plus every per-expert file of one checkpoint directory, merged. The tokenizer:
    ``tokenizer`` if given, else the one the checkpoint's model_config.json names (relative to the
    directory), else the one ``model_config`` names (relative to the working directory)."""
    config_path = os.path.join(step_dir, MODEL_CONFIG_FILE)
    saved = None
    read = [MODEL_STATES] + sorted(n for n in os.listdir(step_dir) if EXPERT_STATES_RE.match(n))
    if os.path.lexists(config_path):
        text = read_small(config_path, MAX_METADATA_BYTES, "model config").decode("utf-8", "replace")
        saved = _config_from_json(text, config_path)
        read.append(MODEL_CONFIG_FILE)
    elif model_config is None:
        raise _missing_config(step_dir)
    config = _as_config(model_config) if model_config is not None else saved
    if tokenizer is not None:
        spec = _tokenizer_spec(tokenizer, os.getcwd(), "--tokenizer")
    elif saved is not None:
        name = sentencepiece_path(saved.text.tokenizer)
        if name and (os.path.basename(name) != name or name in (".", "..")):
            raise ValueError(f"{config_path} names tokenizer {name!r}, which is not a file of the checkpoint; a "
                             f"checkpoint's tokenizer is a file in it ({TOKENIZER_FILE}). Pass the tokenizer the model "
                             "was trained with (--tokenizer PATH, tokenizer= in Python)")
        read += [name] if name else []
        spec = _tokenizer_spec(saved.text.tokenizer, step_dir, config_path, in_checkpoint=True)
    else:
        spec = _tokenizer_spec(config.text.tokenizer, os.getcwd(), f"model config {config.name!r}")
    verify_files(step_dir, read)  # each file read is one its save wrote (size and SHA-256)
    weights = dict(load_weights_only(os.path.join(step_dir, MODEL_STATES))["module"])
    for name in read:
        if EXPERT_STATES_RE.match(name):
            weights.update(load_weights_only(os.path.join(step_dir, name)))
    step = read_marker(step_dir).get("step")
    if not isinstance(step, int):
        match = TAG_RE.match(os.path.basename(step_dir))
        step = int(match.group(1)) if match else None
    return PretrainedState(config, weights, spec, step_dir, step)


def _read_export(path: str) -> PretrainedState:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != EXPORT_FORMAT:
                raise ValueError(f"{path} is a safetensors file but not a moe_dist export (metadata format="
                                 f"{meta.get('format')!r}, expected {EXPORT_FORMAT!r}); write one with moe-dist export")
            weights = {name: f.get_tensor(name) for name in f.keys()}
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"{path} is not a safetensors file ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                         "pass a checkpoint directory or a file written by moe-dist export") from None
    config = _config_from_json(meta.get("model_config", ""), f"{path} (metadata model_config)")
    if meta.get("tokenizer") == "sentencepiece":
        spec: TokenizerSpec = base64.b64decode(meta.get("tokenizer_model", ""))
    elif meta.get("tokenizer") == OPENCLIP_BPE:
        spec = OPENCLIP_BPE
    else:
        raise ValueError(f"{path}: metadata tokenizer={meta.get('tokenizer')!r}; expected 'sentencepiece' or "
                         f"{OPENCLIP_BPE!r} (re-export it with moe-dist export)")
    step = int(meta["step"]) if meta.get("step", "").isdigit() else None
    return PretrainedState(config, weights, spec, path, step)


def _read_hub(folder: str) -> PretrainedState:
    """A Hub folder: the model and tokenizer that config.json names, the tensors of model.safetensors (their
    names and shapes are checked against the config by the caller)."""
    config_path = os.path.join(folder, HUB_CONFIG_FILE)
    try:
        data = json.loads(_config_text(config_path))
    except ValueError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != HUB_FORMAT or not isinstance(data.get("model_config"), dict):
        found = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"{config_path} is not a moe_dist Hub folder's config (format={found!r}, expected "
                         f"{HUB_FORMAT!r} and a model_config object); write one with moe-dist export --format hub")
    config = from_dict(ModelConfig, data["model_config"], f"{config_path} model_config")
    name = sentencepiece_path(config.text.tokenizer)
    if name and (os.path.basename(name) != name or name in (".", "..")):
        raise ValueError(f"{config_path} names tokenizer {name!r}, which is not a file of the folder "
                         f"({TOKENIZER_FILE})")
    spec = _tokenizer_spec(config.text.tokenizer, folder, config_path, in_checkpoint=True)
    state = _read_export(os.path.join(folder, HUB_WEIGHTS_FILE))
    step = data.get("step")
    return PretrainedState(config, state.state_dict, spec, folder, step if isinstance(step, int) else None)


def _config_text(path: str) -> str:
    try:
        return read_small(path, MAX_METADATA_BYTES, "config").decode("utf-8", "replace")
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err})") from None


def _as_config(model_config: ConfigArg) -> ModelConfig:
    return model_config if isinstance(model_config, ModelConfig) else load_model_config(model_config)


def _config_from_json(text: str, where: str) -> ModelConfig:
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{where} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(data).__name__}")
    return from_dict(ModelConfig, data, where)


def _tokenizer_spec(name: str, base: str, where: str, in_checkpoint: bool = False) -> TokenizerSpec:
    """A tokenizer name as bytes (sentencepiece; a relative path is taken from ``base``) or "openclip-bpe".
    A regular file of at most MAX_TOKENIZER_BYTES; ``in_checkpoint``: a file of the checkpoint, never a symlink."""
    path = sentencepiece_path(name)
    if not path:
        return OPENCLIP_BPE
    path = os.path.join(base, path)
    try:
        return read_small(path, MAX_TOKENIZER_BYTES, "tokenizer", follow_symlinks=not in_checkpoint)
    except (OSError, ValueError) as err:
        reason = str(err) if isinstance(err, ValueError) else "which cannot be read"
        raise ValueError(f"{where} names tokenizer {path}: {reason}; pass the sentencepiece model the model was "
                         "trained with (--tokenizer PATH, tokenizer= in Python)") from None


def _missing_config(step_dir: str) -> ValueError:
    hint = ""
    try:  # what the run says it trained (run_config.json predates model_config.json)
        run = read_json(os.path.join(step_dir, "run_config.json"))
        model, tok = run["model"], run["data"].get("tokenizer") or "the model config's"
        overrides = f" with overrides {model['overrides']}" if model.get("overrides") else ""
        hint = f" (its run_config.json names model {model['name']!r}{overrides} and tokenizer {tok})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return ValueError(f"checkpoint {step_dir} has no {MODEL_CONFIG_FILE}: it was written before checkpoints carried "
                      "their model config; name the model it was trained with: --model-config NAME_OR_JSON "
                      f"--tokenizer PATH (model_config=, tokenizer= in Python){hint}")


# ---------------------------------------------------------------------------------------------- checking
def _check_matches(config: ModelConfig, weights: Dict[str, torch.Tensor], source: str) -> None:
    """Every tensor an ep_size=1 model of ``config`` holds, with its shape, and nothing else."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in build_model(config).state_dict().items()}
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    if missing or unexpected:
        parts = [f"{len(missing)} tensors missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        raise ValueError(f"{source} does not match model {config.name!r}: {', '.join(parts)}; an expert file is "
                         "missing, or the model config is not the one it was trained with")
    wrong = [(name, tuple(weights[name].shape), shape) for name, shape in expected.items()
             if tuple(weights[name].shape) != shape]
    if wrong:
        name, got, want = wrong[0]
        raise ValueError(f"{source} does not match model {config.name!r}: {name} has shape {list(got)}, the config "
                         f"gives {list(want)} ({len(wrong)} tensors differ); pass the model config it was trained with")


def _saved_dtype(weights: Dict[str, torch.Tensor]) -> torch.dtype:
    # a router's selection bias stays fp32 in any run (moe/router.py): it does not tell the run's dtype
    dtypes = {t.dtype for k, t in weights.items() if t.is_floating_point() and not k.endswith("selection_bias_ME")}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


# ---------------------------------------------------------------------------------------------- ep_size > 1
def _expert_rank(ep_size: int) -> int:
    """This rank's index in its expert-parallel group (the groups exist once the model is built)."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_rank(f"ep_size_{ep_size}")


def _local_experts(weights: Dict[str, torch.Tensor], ep_rank: int, ep_size: int) -> Dict[str, torch.Tensor]:
    """The ep_size=1 state dict cut to this rank's experts, renumbered to local ids: global experts
    [ep_rank * L, (ep_rank + 1) * L) of each layer, L = num_experts / ep_size (DeepSpeed's placement)."""
    counts = experts_per_layer(weights)
    out = {}
    for name, tensor in weights.items():
        match = _EXPERT_KEY.match(name)
        if not match:
            out[name] = tensor
            continue
        prefix, global_id, rest = match.group(1), int(match.group(2)), match.group(3)
        local = counts[prefix] // ep_size
        if ep_rank * local <= global_id < (ep_rank + 1) * local:
            out[f"{prefix}{global_id - ep_rank * local}{rest}"] = tensor
    return out


def experts_per_layer(weights: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """MoE layer key prefix -> how many experts the state dict holds for it."""
    ids: Dict[str, set] = {}
    for name in weights:
        match = _EXPERT_KEY.match(name)
        if match:
            ids.setdefault(match.group(1), set()).add(int(match.group(2)))
    return {prefix: len(found) for prefix, found in ids.items()}
