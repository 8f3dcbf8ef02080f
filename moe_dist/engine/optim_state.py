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
                  (``optim.param_groups``, built as the saving run built it). fp32: the master copy is the
                  weights (the model files); bf16/fp16 (DeepSpeed's FP16_UnfusedOptimizer): an fp32 master
                  per parameter in ``fp32_groups``.
    layout-free   ``optim_states.pt`` (``moe-dist reshard --with-optimizer``): per global parameter.
An expert tensor is stacked [L, ...] on each rank, and ep rank e holds global experts [e L, (e + 1) L): the
global tensor [E, ...] is the ep ranks' tensors in order, so a piece of rank e's flat tensor at offset o
lies at e L n + o of the global flat tensor.

Outline of a resume on another layout:
    1. ``OptimizerStates.from_checkpoint``: per global parameter, the pieces of its flat tensors and where
       they lie (files are memory-mapped); every parameter must be covered exactly once, with the master
       and both moments, or the checkpoint is refused here, before anything is loaded or renamed;
    2. ``load_into``, one parameter at a time (at most one parameter's state is held beyond the engine's):
       the global rows this rank holds (its experts, or all of it) of the master, exp_avg and exp_avg_sq
       are written into the engine's layout: ZeRO 1/2 through DeepSpeed's fragment mapping
       (``safe_set_full_*``), ZeRO 0 into the optimizer's per-parameter state; the working weights are set
       from the master (finer than a bf16 model file); Adam's step is set in every state.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch

from ..checkpoint_files import EXPERT_STATES_RE, MODEL_STATES, load_weights_only, read_json, read_marker
from ..moe.layer import _DS_EXPERT_RE

MASTER = "fp32"
MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS_READ = (MASTER,) + MOMENTS
LAYOUT_FREE_FILE = "optim_states.pt"
_ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
_FIX = "resume an earlier checkpoint, or this one with --weights-only (fresh Adam moments)"


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

    def read(self, name: str, key: str, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """fp32 rows [lo, hi) (dim 0; all of them by default) of parameter ``name``'s state ``key``
        (coverage was checked by ``from_checkpoint``)."""
        shape = self.shapes[name]
        per_row = math.prod(shape[1:]) if shape else 1
        lo, hi = (rows[0] * per_row, rows[1] * per_row) if rows else (0, math.prod(shape))
        out = torch.empty(hi - lo, dtype=torch.float32)
        for piece in self.pieces[name]:
            a, b = max(lo, piece.start), min(hi, piece.start + piece.numel)
            if a < b:
                out[a - lo:b - lo] = piece.tensors[key][a - piece.start:b - piece.start]
        return out.view((rows[1] - rows[0],) + tuple(shape[1:]) if rows else tuple(shape))

    @classmethod
    def from_checkpoint(cls, tag_dir: str, model_cfg) -> "OptimizerStates":
        """Index (step 1) the optimizer state of checkpoint ``tag_dir`` (any layout) for ``model_cfg``.

        Raises:
            ValueError: the layout is unknown, a file is missing or not of the form DeepSpeed writes, or
                a parameter's state is incomplete, doubled or without its moments; saying what to do.
        """
        layout = checkpoint_layout(tag_dir)
        if layout is None:
            raise ValueError(f"checkpoint {tag_dir} has no run_config.json, so the layout that wrote it is unknown; "
                             "resume it at that layout, or with --weights-only (fresh Adam moments)")
        states = cls(tag_dir, layout, *_global_shapes(model_cfg))
        try:
            if os.path.isfile(os.path.join(tag_dir, LAYOUT_FREE_FILE)):
                _read_layout_free(states, tag_dir)
            elif layout["zero_stage"] in (1, 2):
                _read_zero(states, tag_dir, int(layout["world_size"]), int(layout["ep_size"]))
            else:
                _read_zero0(states, tag_dir, int(layout["ep_size"]), model_cfg)
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise ValueError(f"checkpoint {tag_dir}: its optimizer files are not in the form DeepSpeed 0.19 writes "
                             f"({type(err).__name__}: {err}); {_FIX}") from None
        states._check_complete()
        return states

    def _check_complete(self) -> None:
        """Every parameter covered exactly once, every piece with the master and both moments."""
        for name, shape in self.shapes.items():
            pieces = sorted(self.pieces.get(name, []), key=lambda p: p.start)
            at = 0
            for piece in pieces:
                if piece.start != at or set(piece.tensors) != set(KEYS_READ):
                    break
                at += piece.numel
            if at != math.prod(shape) or not pieces:
                lacks = [k for p in pieces for k in KEYS_READ if k not in p.tensors]
                what = (f"holds no {lacks[0]}" if lacks else
                        f"covers {at} of its {math.prod(shape)} elements" if pieces else "is absent")
                raise ValueError(f"checkpoint {self.source}: the optimizer state of {name} {what} (a rank's "
                                 f"optimizer file missing, cut short or from another run); {_FIX}")

    def save_layout_free(self, path: str) -> None:
        """Write every parameter's whole state (global shapes) to ``path``: what ``from_checkpoint`` reads
        under any layout. It is assembled in memory first: 12 bytes per parameter (master and moments)."""
        params = {name: {k: self.read(name, k) for k in KEYS_READ} for name in sorted(self.shapes)}
        torch.save({"step": self.step, "layout": self.layout, "params": params}, path)


def checkpoint_layout(tag_dir: str) -> Optional[Dict[str, object]]:
    """The layout that wrote ``tag_dir`` (world_size, ep_size, zero_stage, precision: its run_config.json),
    None for a checkpoint without one (written before checkpoints carried their run config)."""
    run = read_json(os.path.join(tag_dir, "run_config.json"))
    if not run:
        return None
    return {"world_size": int(run.get("_world_size", read_marker(tag_dir).get("world_size", 1))),
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
    offset e L n + offset; every other tensor is whole on each ep rank, so ep rank 0's copy is used)."""
    if name in states.experts:
        states.add(name, ep_rank * (math.prod(states.shapes[name]) // ep_size) + offset, tensors)
    elif ep_rank == 0:
        states.add(name, offset, tensors)


def _load(tag_dir: str, name: str, what: str) -> dict:
    path = os.path.join(tag_dir, name)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {tag_dir}: {what} ({name}) is missing; {_FIX}")
    return load_weights_only(path)


def _read_zero(states: OptimizerStates, tag_dir: str, world: int, ep_size: int) -> None:
    """ZeRO 1/2: every rank's partitions, read in rank order so that each parameter's pieces come in the
    order of its group's members (dense: rank r; experts of ep rank r % R: member r // R)."""
    names = {int(m.group(1)): n for n in os.listdir(tag_dir) if (m := _ZERO_FILE.fullmatch(n))}
    filled: Dict[Tuple[str, int], int] = {}
    for r in range(world):
        name = names.get(r, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        osd = _load(tag_dir, name, f"rank {r}'s ZeRO optimizer file (of {world})")
        osd = osd["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            expert = bool(base["param_groups"][g].get("moe"))
            ep_rank = r % ep_size if expert else 0
            state = base["state"].get(g, {})
            flats = {MASTER: osd["single_partition_of_fp32_groups"][g],
                     **{k: state[k] for k in MOMENTS if k in state}}
            if "step" in state:
                states.step = max(states.step, float(state["step"]))
            for pname, address in mapping.items():
                offset = filled.get((pname, ep_rank), 0)
                filled[(pname, ep_rank)] = offset + address.numel
                views = {k: t.narrow(0, address.start, address.numel) for k, t in flats.items()}
                _place(states, pname, ep_rank, ep_size, offset, views)


def _read_zero0(states: OptimizerStates, tag_dir: str, ep_size: int, model_cfg) -> None:
    """ZeRO 0: the optimizer state_dict of each ep rank, its parameters named by ``optim.param_groups``
    on a model shaped as each saving rank's was; fp32 masters from the model files."""
    group_names = _saved_group_names(model_cfg, ep_size)
    files = [f"expp_rank_{e}_mp_rank_00_optim_states.pt" for e in range(ep_size)]
    if not any(os.path.isfile(os.path.join(tag_dir, f)) for f in files):  # a model without MoE layers
        files = [MODEL_STATES]
    masters_from_weights = True
    for e, fname in enumerate(files):
        sd = _load(tag_dir, fname, f"ep rank {e}'s optimizer file")["optimizer"]
        if sd is None:
            raise ValueError(f"checkpoint {tag_dir}: {fname} holds no optimizer state; {_FIX}")
        masters = sd.get("fp32_groups")  # DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 at ZeRO 0)
        masters_from_weights = masters is None
        osd = sd["optimizer_state_dict"] if masters is not None else sd
        saved = [g["params"] for g in osd["param_groups"]]
        if [len(p) for p in saved] != [len(n) for n in group_names]:
            raise ValueError(f"checkpoint {tag_dir}: {fname} has optimizer groups of {[len(p) for p in saved]} "
                             f"parameters, this model {[len(n) for n in group_names]}; resume with the model the "
                             "checkpoint was trained with")
        for g, (ids, names) in enumerate(zip(saved, group_names)):
            for i, (pid, pname) in enumerate(zip(ids, names)):
                state = osd["state"].get(pid, {})
                if "step" in state:
                    states.step = max(states.step, float(state["step"]))
                tensors = {k: state[k].reshape(-1) for k in MOMENTS if k in state}
                if masters is not None:
                    tensors[MASTER] = masters[g][i].reshape(-1)
                local = math.prod(states.shapes[pname]) // (ep_size if pname in states.experts else 1)
                if any(t.numel() != local for t in tensors.values()):
                    raise ValueError(f"checkpoint {tag_dir}: {fname}'s state for {pname} has "
                                     f"{next(iter(tensors.values())).numel()} elements, {local} expected; resume "
                                     "with the model the checkpoint was trained with")
                _place(states, pname, e, ep_size, 0, tensors)
    if masters_from_weights:
        _add_masters_from_weights(states, tag_dir)


def _saved_group_names(model_cfg, ep_size: int) -> List[List[str]]:
    """Parameter names per optimizer group as a rank at ``ep_size`` built them: DeepSpeed splits expert
    groups by element count (``ds_numel`` where set), so the meta model's experts count as local ones."""
    from ..models import build_model
    from .optim import param_groups

    with torch.device("meta"):
        model = build_model(model_cfg)
    for p in model.parameters():
        if getattr(p, "allreduce", True) is False:
            p.ds_numel = p.numel() // ep_size
    ids = {id(p): n for n, p in model.named_parameters()}
    return [[ids[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]


def _add_masters_from_weights(states: OptimizerStates, tag_dir: str) -> None:
    """fp32 at ZeRO 0 keeps no master apart from the weights: read them from the model files (the
    non-expert file and one file per global expert), memory-mapped, as each piece's master."""
    module = _load(tag_dir, MODEL_STATES, "the model file")["module"]
    by_start: Dict[str, Dict[int, Piece]] = {n: {p.start: p for p in ps} for n, ps in states.pieces.items()}
    weights: Dict[str, Dict[int, torch.Tensor]] = {n: {0: t.reshape(-1)} for n, t in module.items()
                                                    if n in states.shapes}
    for fname in sorted(os.listdir(tag_dir)):
        if EXPERT_STATES_RE.match(fname):
            for key, tensor in _load(tag_dir, fname, "an expert's model file").items():
                m = _DS_EXPERT_RE.search(key)  # <layer>.deepspeed_moe.experts.deepspeed_experts.<E>.<w>
                name = f"{key[:m.start()]}experts.{m.group(2)}" if m else key
                if m and name in states.shapes:
                    weights.setdefault(name, {})[int(m.group(1)) * tensor.numel()] = tensor.reshape(-1)
    for name, pieces in by_start.items():
        flat, split = weights.get(name, {}), []
        for start, piece in pieces.items():  # a piece of L experts becomes L pieces: views, nothing copied
            at = start
            for s in sorted(x for x in flat if start <= x < start + piece.numel):
                part = flat[s]
                if s != at or part.dtype != torch.float32:
                    return  # no fp32 weights to take the master from: it stays absent (refused by the caller)
                split.append(Piece(s, {**{k: t.narrow(0, s - start, part.numel()) for k, t in piece.tensors.items()},
                                       MASTER: part}))
                at += part.numel()
        states.pieces[name] = split


def _read_layout_free(states: OptimizerStates, tag_dir: str) -> None:
    saved = load_weights_only(os.path.join(tag_dir, LAYOUT_FREE_FILE))
    states.step = float(saved["step"])
    for name, tensors in saved["params"].items():
        shapes = {tuple(t.shape) for t in tensors.values()}
        if name in states.shapes and shapes != {states.shapes[name]}:
            raise ValueError(f"checkpoint {tag_dir}: {LAYOUT_FREE_FILE} holds {name} with shape {shapes}, this "
                             f"model {states.shapes[name]}; resume with the model the checkpoint was trained with")
        states.add(name, 0, {k: t.reshape(-1) for k, t in tensors.items()})


# ----------------------------------------------------------------------------------------- into an engine
def check_engine(engine) -> None:
    """Refuse (before anything is loaded or renamed) an optimizer wrapper ``load_into`` does not know."""
    if _kind(engine.optimizer) is None:
        raise ValueError(f"resuming optimizer state on another layout is not supported for DeepSpeed's "
                         f"{type(engine.optimizer).__name__}; resume with --weights-only (fresh Adam moments)")


def _kind(optimizer) -> Optional[str]:
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return "zero"
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return "unfused"
    if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "optimizer"):
        return "torch"
    return None


def load_into(engine, states: OptimizerStates) -> None:
    """Step 2 of the outline: put ``states`` into ``engine``'s optimizer, whatever its layout. Call it after
    the weights are loaded (``checkpoint.load_weights``) and before the first step."""
    check_engine(engine)
    optimizer, kind = engine.optimizer, _kind(engine.optimizer)
    if kind == "zero":
        inner = optimizer.optimizer
        for flat in optimizer.single_partition_of_fp32_groups:
            inner.state[flat] = _state(inner, flat, states.step)
        _link_fragments(optimizer)
    if kind == "unfused":
        masters = {id(p): m for lp, fp in zip(optimizer.fp16_groups, optimizer.fp32_groups) for p, m in zip(lp, fp)}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        values = {k: states.read(name, k, _rows(name, p, states)).to(p.device).view_as(p) for k in KEYS_READ}
        if kind == "zero":
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            safe_set_full_fp32_param(p, values[MASTER])
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, values[key], key)
        else:
            target = masters[id(p)] if kind == "unfused" else p
            inner = optimizer.optimizer if kind == "unfused" else optimizer
            state = inner.state[target] = _state(inner, target, states.step)
            for key in MOMENTS:
                state[key].copy_(values[key])
            target.data.copy_(values[MASTER])
        p.data.copy_(values[MASTER])  # the working weights from the master (a bf16 file is coarser)
        del values  # one parameter's state at a time


def _rows(name: str, param: torch.Tensor, states: OptimizerStates) -> Optional[Tuple[int, int]]:
    """The global expert rows this rank holds of an expert tensor (None: the whole tensor)."""
    if name not in states.experts:
        return None
    from ..models.pretrained import _expert_rank

    local = param.shape[0]
    ep_rank = _expert_rank(states.shapes[name][0] // local)
    return ep_rank * local, (ep_rank + 1) * local


def _state(optimizer: torch.optim.Optimizer, param: torch.Tensor, step: float) -> Dict[str, torch.Tensor]:
    """``param``'s Adam state as torch's AdamW makes it at its first step (kept if it exists), at ``step``:
    fused or capturable keep the step on the parameter's device, the default loop on the CPU."""
    state = optimizer.state[param]
    for key in MOMENTS:
        if key not in state:
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
    group = next(g for g in optimizer.param_groups if any(q is param for q in g["params"]))
    on_device = group.get("fused") or group.get("capturable")
    state["step"] = torch.tensor(step, dtype=torch.float32, device=param.device if on_device else "cpu")
    return state


def _link_fragments(optimizer) -> None:
    """Point every parameter's fragment mapping at its group's optimizer state. DeepSpeed links them once,
    after the step of the first group (ZeRO steps group by group), so the later groups' mappings stay
    empty and ``safe_get/set_full_optimizer_state`` fail on them; linking all groups here fixes that."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    for lp_group, flat in zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(lp_group, flat, optimizer.optimizer.state)
    optimizer._hp_optimizer_states_linked = True
