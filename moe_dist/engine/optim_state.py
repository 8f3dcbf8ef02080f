"""Adam's state across layouts: a checkpoint's fp32 master weights, moments and step, read per parameter
whatever layout (world size, ep_size, ZeRO stage, precision) wrote it, and put into an engine of any layout.

Where DeepSpeed 0.19 keeps it (the readers below). Shape legend: E experts of a layer, R ep_size, L = E / R
experts per rank, n the elements of one expert's tensor.
    ZeRO 1/2      ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank r: per optimizer group a flat
                  fp32 partition (master, exp_avg, exp_avg_sq) and ``param_slice_mappings`` (parameter name
                  -> start and numel of its piece of that partition). A group's partitions follow its
                  data-parallel group in order: every rank for the non-expert groups; for the expert groups
                  of ep rank e = r % R, its expert-data-parallel group (ranks e, e + R, e + 2R, ...).
    ZeRO 0        ``expp_rank_<e>_mp_rank_00_optim_states.pt`` per ep rank e (a model without MoE layers:
                  ``mp_rank_00_model_states.pt``): the optimizer's state_dict, numbered in group order
                  (``optim.param_groups``). fp32: per parameter; the weights are the master copy. bf16/fp16
                  (DeepSpeed's FP16_Optimizer): one flat fp32 master and state per group.
    layout-free   ``optim_states.pt`` (``moe-dist reshard --with-optimizer``): per global parameter.
An expert tensor is stacked [L, ...] on each rank, and ep rank e holds global experts [e L, (e + 1) L): the
global tensor [E, ...] is the ep ranks' tensors in order, so a piece of rank e's flat tensor at offset o
lies at e L n + o of the global flat tensor.

Outline of ``load_into`` (a resume on another layout, after the weights are loaded):
    1. ``OptimizerStates.read``: per global parameter, the pieces of its flat tensors and where they lie
       (files are memory-mapped: a rank copies only the bytes of the rows it holds);
    2. for each of the engine's parameters, the global rows it holds (its experts, or all of it);
    3. master (where the source kept one apart from the weights), exp_avg, exp_avg_sq and the step are
       written into the engine's layout: ZeRO 1/2 through DeepSpeed's fragment mapping (``safe_set_full_*``),
       ZeRO 0 into the optimizer's per-parameter or per-group state.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch

from ..checkpoint_files import load_weights_only, read_json, read_marker

MASTER = "fp32"
MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS_READ = (MASTER,) + MOMENTS
LAYOUT_FREE_FILE = "optim_states.pt"
_ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


@dataclass
class Piece:
    """A contiguous piece of one parameter's flat tensors: its offset in the global flat tensor and a 1-D
    view per state key (views of memory-mapped files)."""

    start: int
    tensors: Dict[str, torch.Tensor]

    @property
    def numel(self) -> int:
        return next(iter(self.tensors.values())).numel()


@dataclass
class OptimizerStates:
    """Adam's state of a checkpoint per global parameter (see the module docstring)."""

    source: str
    layout: Dict[str, object]
    shapes: Dict[str, Tuple[int, ...]]  # global shapes (all experts)
    experts: Set[str]  # the expert-parallel parameters (stacked [E, ...], split over the ep ranks)
    step: float = 0.0
    pieces: Dict[str, List[Piece]] = field(default_factory=dict)

    def add(self, name: str, start: int, tensors: Dict[str, torch.Tensor]) -> None:
        if name not in self.shapes:
            raise ValueError(f"checkpoint {self.source}: its optimizer state names {name!r}, which this model "
                             "does not have; resume with the model the checkpoint was trained with")
        self.pieces.setdefault(name, []).append(Piece(start, tensors))

    def keys(self) -> Tuple[str, ...]:
        """The state keys every piece holds (the master copy only where the source kept one)."""
        found = [set(p.tensors) for pieces in self.pieces.values() for p in pieces]
        return tuple(k for k in KEYS_READ if found and all(k in f for f in found))

    def read(self, name: str, key: str, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """fp32 rows [lo, hi) (dim 0; all of them by default) of parameter ``name``'s state ``key``.

        Raises:
            ValueError: some element of them is in no file (a rank's optimizer shard is missing).
        """
        shape = self.shapes[name]
        per_row = math.prod(shape[1:]) if shape else 1
        lo, hi = (rows[0] * per_row, rows[1] * per_row) if rows else (0, math.prod(shape))
        out = torch.empty(hi - lo, dtype=torch.float32)
        covered = 0
        for piece in self.pieces.get(name, ()):
            a, b = max(lo, piece.start), min(hi, piece.start + piece.numel)
            if a < b:
                out[a - lo:b - lo] = piece.tensors[key][a - piece.start:b - piece.start]
                covered += b - a
        if covered != hi - lo:
            raise ValueError(f"checkpoint {self.source}: the optimizer state of {name} is incomplete ({covered} of "
                             f"{hi - lo} elements found): a rank's optimizer file is missing or was cut short. "
                             "Resume an earlier checkpoint, or this one with --weights-only (fresh Adam moments)")
        rows_shape = (rows[1] - rows[0],) + tuple(shape[1:]) if rows else tuple(shape)
        return out.view(rows_shape)

    @classmethod
    def from_checkpoint(cls, tag_dir: str, model_cfg) -> "OptimizerStates":
        """Index the optimizer state of checkpoint ``tag_dir`` (any layout) for the model ``model_cfg``."""
        layout = checkpoint_layout(tag_dir)
        states = cls(tag_dir, layout, *_global_shapes(model_cfg))
        if os.path.isfile(os.path.join(tag_dir, LAYOUT_FREE_FILE)):
            _read_layout_free(states, tag_dir)
        elif layout["zero_stage"] in (1, 2):
            _read_zero(states, tag_dir, int(layout["world_size"]), int(layout["ep_size"]))
        else:
            _read_zero0(states, tag_dir, int(layout["ep_size"]), model_cfg, str(layout["precision"]))
        missing = sorted(set(states.shapes) - set(states.pieces))
        if missing:
            raise ValueError(f"checkpoint {tag_dir}: no optimizer state for {len(missing)} parameters "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); resume it with "
                             "--weights-only (fresh Adam moments)")
        return states

    def save_layout_free(self, path: str) -> None:
        """Write every parameter's whole state (global shapes) to ``path``: what ``from_checkpoint`` reads
        under any layout. It is assembled in memory first: 12 bytes per parameter (master and moments)."""
        keys = self.keys()
        params = {name: {k: self.read(name, k) for k in keys} for name in sorted(self.shapes)}
        torch.save({"step": self.step, "layout": self.layout, "params": params}, path)


def checkpoint_layout(tag_dir: str) -> Dict[str, object]:
    """The layout that wrote ``tag_dir``: world_size, ep_size, zero_stage and precision (its
    run_config.json and COMPLETE marker)."""
    run = read_json(os.path.join(tag_dir, "run_config.json")) or {}
    marker = read_marker(tag_dir)
    return {"world_size": int(run.get("_world_size", marker.get("world_size", 1))),
            "ep_size": int(run.get("ep_size", 1)), "zero_stage": int(run.get("zero_stage", 0)),
            "precision": str(run.get("precision", "fp32"))}


def _global_shapes(model_cfg) -> Tuple[Dict[str, Tuple[int, ...]], Set[str]]:
    """The trained parameters' global shapes, and which are expert-parallel (``experts.tag_expert_params``)."""
    from ..models import build_model

    with torch.device("meta"):
        params = [(n, p) for n, p in build_model(model_cfg).named_parameters() if p.requires_grad]
    return {n: tuple(p.shape) for n, p in params}, {n for n, p in params if getattr(p, "allreduce", True) is False}


def _place(states: OptimizerStates, name: str, ep_rank: int, ep_size: int, offset: int,
           tensors: Dict[str, torch.Tensor]) -> None:
    """Add a piece at ``offset`` of ep rank ``ep_rank``'s local flat tensor of ``name`` (experts: global
    offset e L n + offset; every other tensor is whole on each rank, so ep rank 0's copy is used)."""
    if name in states.experts:
        local = math.prod(states.shapes[name]) // ep_size
        states.add(name, ep_rank * local + offset, tensors)
    elif ep_rank == 0:
        states.add(name, offset, tensors)


def _load(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} is missing: the checkpoint is incomplete. Resume an earlier checkpoint, "
                         "or this one with --weights-only (fresh Adam moments)")
    return load_weights_only(path)


def _read_zero(states: OptimizerStates, tag_dir: str, world: int, ep_size: int) -> None:
    """ZeRO 1/2: every rank's partitions, read in rank order so that each parameter's pieces come in the
    order of its group's members (dense: rank r; experts of ep rank r % R: member r // R)."""
    names = {int(m.group(1)): n for n in os.listdir(tag_dir) if (m := _ZERO_FILE.fullmatch(n))}
    filled: Dict[Tuple[str, int], int] = {}
    for r in range(world):
        if r not in names:
            raise ValueError(f"checkpoint {tag_dir}: rank {r}'s ZeRO optimizer file (zero_pp_rank_{r}_mp_rank_00_"
                             f"optim_states.pt) is missing ({world} ranks wrote it). Resume an earlier checkpoint, "
                             "or this one with --weights-only (fresh Adam moments)")
        osd = _load(os.path.join(tag_dir, names[r]), f"rank {r}'s ZeRO optimizer file")["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            expert = bool(base["param_groups"][g].get("moe"))
            ep_rank = r % ep_size if expert else 0
            state = base["state"].get(g, {})
            flats = {MASTER: osd["single_partition_of_fp32_groups"][g],
                     **{k: state[k] for k in MOMENTS if k in state}}
            if "step" in state:
                states.step = max(states.step, float(state["step"]))
            for name, address in mapping.items():
                offset = filled.get((name, ep_rank), 0)
                filled[(name, ep_rank)] = offset + address.numel
                views = {k: t.narrow(0, address.start, address.numel) for k, t in flats.items()}
                _place(states, name, ep_rank, ep_size, offset, views)


def _read_zero0(states: OptimizerStates, tag_dir: str, ep_size: int, model_cfg, precision: str) -> None:
    """ZeRO 0: the optimizer state_dict of each ep rank, its parameters named by ``optim.param_groups``."""
    from ..models import build_model
    from .optim import param_groups

    with torch.device("meta"):
        model = build_model(model_cfg)
    ids = {id(p): n for n, p in model.named_parameters()}
    group_names = [[ids[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]
    files = [f"expp_rank_{e}_mp_rank_00_optim_states.pt" for e in range(ep_size)]
    if not any(os.path.isfile(os.path.join(tag_dir, f)) for f in files):  # a model without MoE layers
        files = ["mp_rank_00_model_states.pt"]
    for e, name in enumerate(files):
        sd = _load(os.path.join(tag_dir, name), f"ep rank {e}'s optimizer file")["optimizer"]
        if sd is None:
            raise ValueError(f"checkpoint {tag_dir}: {name} holds no optimizer state")
        flat = "fp32_groups_flat" in sd  # FP16_Optimizer (bf16/fp16 at ZeRO 0, DeepSpeed's fused Adam)
        masters = sd.get("fp32_groups")  # FP16_UnfusedOptimizer (bf16/fp16 at ZeRO 0, a torch optimizer)
        osd = sd["optimizer_state_dict"] if flat or masters is not None else sd
        if len(osd["param_groups"]) != len(group_names):
            raise ValueError(f"checkpoint {tag_dir}: {name} has {len(osd['param_groups'])} optimizer groups, this "
                             f"model {len(group_names)}; resume with the model the checkpoint was trained with")
        for g, (saved, names) in enumerate(zip(osd["param_groups"], group_names)):
            if flat:
                _place_flat_group(states, names, e, ep_size, sd["fp32_groups_flat"][g], osd["state"].get(g, {}))
                continue
            for i, (pid, pname) in enumerate(zip(saved["params"], names)):
                state = osd["state"].get(pid, {})
                if "step" in state:
                    states.step = max(states.step, float(state["step"]))
                tensors = {k: state[k].reshape(-1) for k in MOMENTS if k in state}
                if masters is not None:
                    tensors[MASTER] = masters[g][i].reshape(-1)
                _place(states, pname, e, ep_size, 0, tensors)


def _place_flat_group(states: OptimizerStates, names: List[str], ep_rank: int, ep_size: int,
                      master: torch.Tensor, state: dict) -> None:
    """One FP16_Optimizer group: the parameters' flat tensors back to back, no padding."""
    if "step" in state:
        states.step = max(states.step, float(state["step"]))
    flats = {MASTER: master, **{k: state[k] for k in MOMENTS if k in state}}
    offset = 0
    for name in names:
        numel = math.prod(states.shapes[name]) // (ep_size if name in states.experts else 1)
        _place(states, name, ep_rank, ep_size, 0, {k: t.narrow(0, offset, numel) for k, t in flats.items()})
        offset += numel
    if offset != master.numel():
        raise ValueError(f"checkpoint {states.source}: an FP16_Optimizer group holds {master.numel()} elements, "
                         f"its parameters {offset}; resume with the model the checkpoint was trained with")


def _read_layout_free(states: OptimizerStates, tag_dir: str) -> None:
    saved = load_weights_only(os.path.join(tag_dir, LAYOUT_FREE_FILE))
    states.step = float(saved["step"])
    for name, tensors in saved["params"].items():
        if name in states.shapes and tuple(next(iter(tensors.values())).shape) != states.shapes[name]:
            raise ValueError(f"checkpoint {tag_dir}: {LAYOUT_FREE_FILE} holds {name} with shape "
                             f"{tuple(next(iter(tensors.values())).shape)}, this model {states.shapes[name]}")
        states.add(name, 0, {k: t.reshape(-1) for k, t in tensors.items()})


# ----------------------------------------------------------------------------------------- into an engine
def load_into(engine, states: OptimizerStates) -> None:
    """Steps 2-3 of the outline: put ``states`` into ``engine``'s optimizer, whatever its layout. Call it
    after the weights are loaded (``checkpoint.load_weights``) and before the first step."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    keys = states.keys()
    values = {n: {k: states.read(n, k, _rows(n, p, states)).to(p.device) for k in keys} for n, p in params}
    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        _into_zero(optimizer, params, values, states.step)
    elif isinstance(optimizer, FP16_Optimizer):
        _into_fp16_optimizer(optimizer, dict(params), values, states.step)
    elif isinstance(optimizer, FP16_UnfusedOptimizer):
        _into_unfused(optimizer, dict(params), values, states.step)
    elif isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "optimizer"):
        _into_torch(optimizer, params, values, states.step)
    else:
        raise ValueError(f"resuming optimizer state across layouts is not supported for DeepSpeed's "
                         f"{type(optimizer).__name__}; resume with --weights-only (fresh Adam moments)")


def _rows(name: str, param: torch.Tensor, states: OptimizerStates) -> Optional[Tuple[int, int]]:
    """The global expert rows this rank holds of an expert tensor (None: the whole tensor)."""
    if name not in states.experts:
        return None
    from deepspeed.utils import groups

    local = param.shape[0]
    ep_rank = groups._get_expert_parallel_rank(param.group_name)
    return ep_rank * local, (ep_rank + 1) * local


def _step_tensor(like: torch.Tensor, step: float) -> torch.Tensor:
    return torch.tensor(step, dtype=like.dtype, device=like.device)


def _new_state(flat: torch.Tensor, step: float) -> Dict[str, torch.Tensor]:
    """The state torch's AdamW creates at its first step (fused: a float32 step on the parameter's device)."""
    return {"step": torch.tensor(step, dtype=torch.float32, device=flat.device),
            **{k: torch.zeros_like(flat, memory_format=torch.preserve_format) for k in MOMENTS}}


def _into_zero(optimizer, params, values, step: float) -> None:
    """ZeRO 1/2: the flat partitions' state is created as AdamW would, linked to DeepSpeed's fragment
    mapping, and every parameter's fragment set from its whole value."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    inner = optimizer.optimizer
    for flat in optimizer.single_partition_of_fp32_groups:
        if not inner.state[flat]:
            inner.state[flat] = _new_state(flat, step)
        inner.state[flat]["step"] = _step_tensor(inner.state[flat]["step"], step)
    _link_fragments(optimizer)
    for name, p in params:
        for key, value in values[name].items():
            if key == MASTER:
                safe_set_full_fp32_param(p, value.view_as(p))
            else:
                safe_set_full_optimizer_state(p, value.view_as(p), key)


def _link_fragments(optimizer) -> None:
    """Point every parameter's fragment mapping at its group's optimizer state. DeepSpeed links them once,
    after the step of the first group (ZeRO steps group by group), so the later groups' mappings stay
    empty and ``safe_get/set_full_optimizer_state`` fail on them; linking all groups here fixes that."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    for lp_group, flat in zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(lp_group, flat, optimizer.optimizer.state)
    optimizer._hp_optimizer_states_linked = True


def _into_fp16_optimizer(optimizer, params, values, step: float) -> None:
    """DeepSpeed's FP16_Optimizer (bf16/fp16 at ZeRO 0): per group one flat fp32 master and state."""
    by_id = {id(p): n for n, p in params.items()}
    for g, group in enumerate(optimizer.fp16_groups):
        flat = optimizer.fp32_groups_flat[g]
        state = optimizer.optimizer.state[flat]
        if not state:
            state.update(_new_state(flat, step))
        state["step"] = _step_tensor(state["step"], step)
        offset = 0
        for p in group:
            given = values[by_id[id(p)]]
            n = p.numel()
            for key, value in given.items():
                (flat if key == MASTER else state[key]).data[offset:offset + n] = value.reshape(-1)
            if MASTER in given:
                p.data.copy_(given[MASTER].view_as(p))
            offset += n


def _into_unfused(optimizer, params, values, step: float) -> None:
    """DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 at ZeRO 0): an fp32 master tensor per parameter."""
    by_id = {id(p): n for n, p in params.items()}
    for lp_group, fp32_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
        for p, master in zip(lp_group, fp32_group):
            given = values[by_id[id(p)]]
            state = optimizer.optimizer.state[master]
            if not state:
                state.update(_new_state(master, step))
            state["step"] = _step_tensor(state["step"], step)
            for key in MOMENTS:
                if key in given:
                    state[key].copy_(given[key].view_as(master))
            if MASTER in given:
                master.data.copy_(given[MASTER].view_as(master))
                p.data.copy_(given[MASTER].view_as(p))


def _into_torch(optimizer: torch.optim.Optimizer, params, values, step: float) -> None:
    """fp32 at ZeRO 0: DeepSpeed steps the torch optimizer itself, on the parameters (their own master)."""
    for name, p in params:
        given = values[name]
        state = optimizer.state[p]
        if not state:
            state.update(_new_state(p, step))
        state["step"] = _step_tensor(state["step"], step)
        for key in MOMENTS:
            if key in given:
                state[key].copy_(given[key].view_as(p))
        if MASTER in given:
            p.data.copy_(given[MASTER].view_as(p))
