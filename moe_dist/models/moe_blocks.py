"""Putting MoELayer into open_clip transformer blocks and collecting what the layers computed.

open_clip's ResidualAttentionBlock calls ``self.mlp(x)`` with the tokens only, so ``MoEMLP`` takes the
per-call routing context (modality, padding mask) from ``routing_context`` and keeps its
``MoEOutput`` until ``collect_moe_outputs`` pops it right after the tower's forward.

Block options (``configure_blocks``), applied per transformer block without changing a parameter
name or state-dict key:
    activation checkpointing "blocks": every block's forward runs under torch's non-reentrant
        checkpoint. The recomputation in backward runs after ``routing_context`` has ended, so the
        context captured at forward time is replayed into the block's MoE MLPs (``context_fn``), and
        the ``MoEOutput`` a recomputation produces is discarded (the forward's aux losses and stats are
        the ones collected; autograd recomputes exactly what it saved, RNG included). Early stopping is
        off, so every rank re-runs all of a block's all-to-alls in the same order.
    activation checkpointing "moe": only the MoE layer call is checkpointed (its dispatched rows and
        expert hidden activations are the largest per-token tensors of an MoE block).
    compile (``COMPILE_MODES``):
        "blocks": each block's forward is compiled with torch.compile (inductor; CUDA and CPU alike),
            the MoE layer inside it at ep_size 1 (no host read, no data-dependent shape: moe/). With
            expert parallelism (or a global-batch balance loss over several ranks) the layer, which
            communicates (``MoELayer.communicates``), stays eager behind ``torch.compiler.disable``
            (``MoEMLP.forward``). MoE-CLIP's text blocks see the batch's caption length (the tower
            stops at the last EOS): the second length they meet recompiles them once with a dynamic
            length. Each kind of block (block list, block class, MLP class) compiles its own copy of the
            forward, so that no kind shares dynamo's per-code-object cache (and its limit of 8 graphs)
            with the others. The blocks are every Transformer's ``resblocks`` and a CoCa decoder's
            ``cross_attn`` blocks.
        "model": the whole model's forward is one graph (``fullgraph`` when no layer communicates: a break is an
            error, not a silent slowdown), as open_clip compiles; module hooks (DeepSpeed's) run outside.
            MoE-CLIP's forward no longer cuts its text after the batch's last EOS (that reads the length
            on the host): the trainer cuts each batch before its copy to the device (``trim_text_batch``),
            and the graph recompiles once for a dynamic length.
            Activation checkpointing does not trace and is refused.
        "auto": "model" on an accelerator ("blocks" with activation checkpointing), nothing on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..moe import MoEConfig, MoEOutput, build_moe_layer


class MoEMLP(nn.Module):
    """Drop-in replacement for an open_clip block's ``mlp``: tokens [B, L, D] -> [B, L, D]."""

    def __init__(self, config: MoEConfig, ep_size: int = 1):
        super().__init__()
        self.moe = build_moe_layer(config, ep_size)
        self.modality: Optional[torch.Tensor] = None
        self.padding_mask: Optional[torch.Tensor] = None
        self.last: Optional[MoEOutput] = None
        self.checkpoint = False  # activation checkpointing "moe" (configure_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.moe.communicates:  # the all-to-alls (and all-reduces) run eager (module docstring)
            return self._eager(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            self.last = checkpoint(self.moe, x, modality=self.modality, padding_mask=self.padding_mask,
                                   use_reentrant=False, early_stop=False)
        else:
            self.last = self.moe(x, modality=self.modality, padding_mask=self.padding_mask)
        return self.last.output

    _eager = torch.compiler.disable(_forward)


def place_moe(transformer: nn.Module, blocks: List[int], config: MoEConfig, ep_size: int, prefix: str) -> None:
    """Replace ``transformer.resblocks[i].mlp`` by an MoEMLP for every i in ``blocks``."""
    for i in blocks:
        block = transformer.resblocks[i]
        mlp = MoEMLP(config, ep_size)
        mlp.layer_name = f"{prefix}.{i}"
        block.mlp = mlp


def moe_mlps(module: nn.Module) -> Iterator[MoEMLP]:
    return (m for m in module.modules() if isinstance(m, MoEMLP))


@contextlib.contextmanager
def eval_routing(model: torch.nn.Module, dropless: bool) -> Iterator[None]:
    """Eval mode and dropless (or configured-capacity) MoE dispatch; the previous mode and each layer's
    dispatch policy come back afterwards (training calls this mid-run)."""
    layers = [m.moe for m in moe_mlps(model)]
    saved = [(layer, layer.policy) for layer in layers]
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.set_dropless(dropless)
    try:
        yield
    finally:
        for layer, policy in saved:
            layer.policy = policy
        model.train(was_training)


def set_dropless(module: nn.Module, dropless: bool = True) -> None:
    """Dropless (or the configured capacity) dispatch in every MoE layer under ``module``."""
    for m in moe_mlps(module):
        m.moe.set_dropless(dropless)


@contextlib.contextmanager
def routing_context(module: nn.Module, modality=None, padding_mask=None):
    """Give every MoEMLP under ``module`` the modality/padding of the tokens about to pass."""
    mlps = list(moe_mlps(module))
    for m in mlps:
        m.modality, m.padding_mask = modality, padding_mask
    try:
        yield
    finally:
        for m in mlps:
            m.modality = m.padding_mask = None


@dataclass
class MoEAux:
    """MoE results of one model forward: weighted aux loss, unweighted losses summed over layers,
    and per-layer stats ("vision.3" -> stats dict)."""

    aux_loss: torch.Tensor
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    layer_stats: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    layer_loads: Dict[str, torch.Tensor] = field(default_factory=dict)  # MoEOutput.load_ME of layers that track one


def collect_moe_outputs(module: nn.Module, like: torch.Tensor) -> MoEAux:
    """Pop the outputs the MoE layers under ``module`` kept during the last forward."""
    aux = like.new_zeros((), dtype=torch.float32)
    losses: Dict[str, torch.Tensor] = {}
    stats: Dict[str, Dict[str, torch.Tensor]] = {}
    loads: Dict[str, torch.Tensor] = {}
    for m in moe_mlps(module):
        out, m.last = m.last, None
        if out is None:
            continue
        aux = aux + out.aux_loss
        for name, value in out.losses.items():
            losses[name] = losses.get(name, 0) + value
        stats[m.layer_name] = out.stats
        if out.load_ME is not None:
            loads[m.layer_name] = out.load_ME
    return MoEAux(aux, losses, stats, loads)


CHECKPOINT_MODES = ("none", "blocks", "moe")
COMPILE_MODES = ("none", "blocks", "model", "auto")


def compile_mode(compile, activation_checkpointing: str = "none", device_type: str = "cpu") -> str:
    """The compile mode to apply: ``compile`` from ``COMPILE_MODES`` (or a bool: True is "blocks"),
    "auto" resolved for ``device_type``. Raises ValueError for a mode that cannot compile what it is given."""
    if isinstance(compile, bool):
        compile = "blocks" if compile else "none"
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r} is unknown; use one of {COMPILE_MODES}")
    if compile == "auto":
        if device_type == "cpu":
            return "none"
        return "model" if activation_checkpointing == "none" else "blocks"
    if compile == "model" and activation_checkpointing != "none":
        raise ValueError(f"compile=model cannot trace activation_checkpointing={activation_checkpointing!r} (its "
                         "recomputation replays the routing context outside the graph); use compile=blocks with "
                         "it, or activation_checkpointing=none")
    return compile


def _block_lists(module: nn.Module) -> List[nn.ModuleList]:
    """The block lists under ``module``: each Transformer's ``resblocks`` and a CoCa decoder's
    ``cross_attn`` (MultimodalTransformer), in module order."""
    lists = [getattr(m, name, None) for m in module.modules() for name in ("resblocks", "cross_attn")]
    return [blocks for blocks in lists if isinstance(blocks, nn.ModuleList)]


def transformer_blocks(module: nn.Module) -> List[nn.Module]:
    """Every open_clip transformer block under ``module`` (``_block_lists``)."""
    return [block for blocks in _block_lists(module) for block in blocks]


def configure_blocks(module: nn.Module, activation_checkpointing: str = "none", compile="none",
                     device_type: str = "cpu") -> None:
    """Activation checkpointing and/or torch.compile (see the module docstring).

    Args:
        module: a model (or tower); call once, before ``deepspeed.initialize``.
        activation_checkpointing: "none", "blocks" (every block) or "moe" (the MoE layers only).
        compile: a mode in ``COMPILE_MODES`` (True is "blocks").
        device_type: where the model runs ("auto" compiles on accelerators only).
    """
    if activation_checkpointing not in CHECKPOINT_MODES:
        raise ValueError(f"activation_checkpointing={activation_checkpointing!r} is unknown; use one of {CHECKPOINT_MODES}")
    compile = compile_mode(compile, activation_checkpointing, device_type)
    for m in moe_mlps(module):
        m.checkpoint = activation_checkpointing == "moe"
    if compile == "model":
        for m in module.modules():
            if hasattr(m, "trim_in_forward"):  # a host read; callers cut host batches (trim_text_batch)
                m.trim_in_forward = False
        expert_parallel = any(m.moe.communicates for m in moe_mlps(module))
        # the forward, not the module call: hooks stay outside the graph (DeepSpeed's engine times every
        # forward in a pre-hook, which no graph can hold); an instance attribute, so parameter names and
        # state-dict keys stay (as with "blocks": a deepcopy of the model would still call this one's
        # forward, and the model no longer pickles; nothing here copies or pickles models)
        module.forward = torch.compile(module.forward, fullgraph=not expert_parallel)
        return
    compile = compile == "blocks"
    if activation_checkpointing != "blocks" and not compile:
        return
    kinds: Dict[tuple, object] = {}  # (block list, block class, mlp class, forward) -> its copy of the forward
    for blocks in _block_lists(module):
        for block in blocks:
            _configure_block(block, blocks, activation_checkpointing, compile, kinds)


def _configure_block(block: nn.Module, siblings: nn.ModuleList, activation_checkpointing: str, compile: bool,
                     kinds: Dict[tuple, object]) -> None:
    forward = block.forward
    if compile:
        # torch.compile keeps its graphs, and its limit of 8 recompilations, per code object, and every
        # block of every tower runs the one ResidualAttentionBlock.forward: dense and MoE blocks, vision
        # (fixed length, no mask) and text (causal mask, lengths that vary per batch), training and eval
        # need more variants than that, so past the limit blocks ran eager behind a chain of failing
        # guards. Each kind of block gets its own copy of the function: its own cache of 2-4 graphs.
        fn = getattr(forward, "__func__", None)  # the class's forward; an instance's own is compiled as is
        kind = (id(siblings), type(block), type(getattr(block, "mlp", None)), fn)
        if fn is not None and kind not in kinds:
            copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                      fn.__closure__)
            copy.__kwdefaults__, copy.__dict__ = fn.__kwdefaults__, dict(fn.__dict__)
            kinds[kind] = copy
        forward = torch.compile(forward if fn is None else types.MethodType(kinds[kind], block))
    if activation_checkpointing == "blocks":
        forward = functools.partial(_checkpointed_forward, forward, list(moe_mlps(block)))
    block.forward = forward  # an instance attribute: parameter names and state-dict keys stay


def _checkpointed_forward(forward, mlps: List[MoEMLP], *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, early_stop=False,
                      context_fn=functools.partial(_replay_routing, mlps), **kwargs)


def _replay_routing(mlps: List[MoEMLP]):
    """checkpoint's (forward, recompute) contexts: the recompute sees the routing context of the forward."""
    captured = [(m.modality, m.padding_mask) for m in mlps]

    @contextlib.contextmanager
    def recompute():
        before = [(m.modality, m.padding_mask, m.last) for m in mlps]
        for m, (modality, padding) in zip(mlps, captured):
            m.modality, m.padding_mask = modality, padding
        try:
            yield
        finally:  # the recomputed MoEOutput is not a result of any forward: drop it
            for m, (modality, padding, last) in zip(mlps, before):
                m.modality, m.padding_mask, m.last = modality, padding, last

    return contextlib.nullcontext(), recompute()
