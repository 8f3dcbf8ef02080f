"""Routing analysis: which experts each modality and each class choose, how sure the router is, what a
capacity would drop, and which experts are (almost) never used.

Shape legend: T tokens of one layer call, K slots per token, E experts, C classes, M modalities (image, text,
cross: a CoCa decoder's tokens).

Outline:
    1. ``RoutingProbe`` puts a forward pre-hook on every MoE layer (to learn the token rows' length L of
       the call: tokens arrive as [rows, L, D] with rows = B for one tower or 2B for LIMoE's stacked
       batch) and a forward hook on its router, which returns the ``Routing`` of the call;
    2. from each ``Routing`` it counts, per layer, the selected (token, expert) assignments by modality
       and by the class of the token's sample (row r belongs to sample r mod B), the summed router
       entropy, and the assignments a capacity of ``capacity_factor`` would drop (computed here with the
       layer's own capacity policy, per call, whatever the model ran with);
    3. ``summary`` turns the counts into a JSON-able report; ``save_plots`` draws the heatmaps.
Counts cover real tokens only (padding is never routed); a layer's assignment counts add up to its
tokens x K for top-k routing. An Expert-Choice layer reports its own (exact) capacity's choices; a Soft MoE
layer reports each token's combine weight per expert (its slots summed, "unit": "slot_weight"), so its
row sums to its tokens.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch

from ..models.moe_blocks import moe_mlps
from ..moe import MODALITY_NAMES
from ..moe.dispatch import CapacityDrop, build_capacity_policy
from ..moe.losses import entropy

RARE_SHARE = 0.1  # an expert with less than this fraction of the uniform share is "rare"


class LayerTally:
    """Counts of one MoE layer (float64, on the CPU)."""

    def __init__(self, num_experts: int, num_classes: int):
        M, E = len(MODALITY_NAMES), num_experts
        self.assign_ME = torch.zeros(M, E, dtype=torch.float64)
        self.class_assign_MCE = torch.zeros(M, max(num_classes, 1), E, dtype=torch.float64)
        self.tokens_M = torch.zeros(M, dtype=torch.float64)
        self.entropy_M = torch.zeros(M, dtype=torch.float64)
        self.selected_M = torch.zeros(M, dtype=torch.float64)
        self.dropped_M = torch.zeros(M, dtype=torch.float64)
        self.soft = False  # Soft MoE: assignments are slot weights (RoutingProbe._record_soft)


class RoutingProbe:
    """Records the routing of every MoE layer under ``model`` while it is active (a context manager).

    Args:
        model: an MoECLIP or LIMoE.
        num_classes: classes of the labels passed to ``set_batch`` (0: no per-class counts).
        capacity_factor: the capacity whose drops are reported (per layer call, as at evaluation).
    """

    def __init__(self, model: torch.nn.Module, num_classes: int = 0, capacity_factor: float = 1.0):
        self.num_classes, self.capacity_factor = num_classes, capacity_factor
        self.layers = {m.layer_name: m.moe for m in moe_mlps(model)}
        self.tallies = {name: LayerTally(layer.num_experts, num_classes) for name, layer in self.layers.items()}
        # the drops a capacity would cause; a router that fixes its own capacity (Expert-Choice) keeps its own
        self.policies = {name: build_capacity_policy(layer.config) if layer.config.router_class.capacity_policy
                         else CapacityDrop(layer.config.replace(dropless=False, eval_capacity_factor=capacity_factor))
                         for name, layer in self.layers.items()}
        self._modality: Dict[str, Optional[torch.Tensor]] = {}
        self._rows: Dict[str, int] = {}
        self._labels_B: Optional[torch.Tensor] = None
        self._handles: List = []
        self.samples = 0

    def __enter__(self) -> "RoutingProbe":
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            self._handles.append(layer.router.register_forward_hook(self._router_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def set_batch(self, batch_size: int, labels_B: Optional[torch.Tensor] = None) -> None:
        """Call before each forward: the batch size and (optionally) each sample's class index."""
        self._batch_size = batch_size
        self._labels_B = None if labels_B is None else labels_B.long().cpu()
        self.samples += batch_size

    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            x = args[0]
            self._rows[name] = x.shape[-2] if x.dim() >= 3 else 1  # L of [rows, L, D]
            modality = kwargs.get("modality", args[1] if len(args) > 1 else None)
            self._modality[name] = None if modality is None else modality.expand(x.shape[:-1]).reshape(-1)
        return hook

    def _router_hook(self, name: str):
        def hook(module, args, routing):
            if isinstance(routing, tuple):  # Soft MoE's (dispatch, combine) weights, moe/soft.py
                self._record_soft(name, routing[1], args[1])
            else:
                self._record(name, routing)
        return hook

    @torch.no_grad()
    def _record_soft(self, name: str, combine_BLS: torch.Tensor, mask_BL: Optional[torch.Tensor]) -> None:
        """Soft MoE: each token's combine weight per expert (its slots summed) stands for its assignments,
        so a layer's row sums to its tokens; nothing is dropped."""
        tally = self.tallies[name]
        tally.soft = True
        E = tally.assign_ME.shape[1]
        B, L, S = combine_BLS.shape
        c_TE = combine_BLS.double().reshape(B * L, E, S // E).sum(-1)
        real_T = torch.ones(B * L, dtype=torch.bool, device=c_TE.device) if mask_BL is None else mask_BL.reshape(-1)
        modality_T = self._modality.get(name)
        if modality_T is None:
            modality_T = torch.zeros(B * L, dtype=torch.long, device=c_TE.device)
        entropy_T = entropy(combine_BLS.double().reshape(B * L, S))
        for m in range(len(MODALITY_NAMES)):
            tokens_T = real_T & (modality_T == m)
            tally.assign_ME[m] += c_TE[tokens_T].sum(0).cpu()
            tally.tokens_M[m] += float(tokens_T.sum())
            tally.entropy_M[m] += float(entropy_T[tokens_T].sum())
            tally.selected_M[m] += float(tokens_T.sum())

    @torch.no_grad()
    def _record(self, name: str, routing) -> None:
        tally = self.tallies[name]
        T, E = routing.probs_TE.shape
        modality_T = routing.modality_T
        if modality_T is None:
            modality_T = torch.zeros(T, dtype=torch.long, device=routing.probs_TE.device)
        real_T = routing.token_mask_T
        kept_TK = self.policies[name].keep(routing, training=False)
        entropy_T = entropy(routing.probs_TE).double()
        sample_T = (torch.arange(T, device=real_T.device) // self._rows[name]) % self._batch_size
        for m in range(len(MODALITY_NAMES)):
            tokens_T = real_T & (modality_T == m)
            sel_TK = routing.valid_TK & tokens_T[:, None]
            experts_A = routing.experts_TK[sel_TK]
            tally.assign_ME[m] += torch.bincount(experts_A, minlength=E).double().cpu()
            tally.tokens_M[m] += float(tokens_T.sum())
            tally.entropy_M[m] += float(entropy_T[tokens_T].sum())
            tally.selected_M[m] += float(sel_TK.sum())
            tally.dropped_M[m] += float((sel_TK & ~kept_TK).sum())
            if self._labels_B is not None and self.num_classes:
                K = routing.experts_TK.shape[1]
                classes_A = self._labels_B[sample_T.cpu()][:, None].expand(T, K)[sel_TK.cpu()]
                flat = classes_A * E + experts_A.cpu()
                tally.class_assign_MCE[m] += torch.bincount(flat, minlength=self.num_classes * E).view(-1, E).double()

    def summary(self, class_names: Sequence[str] = ()) -> Dict[str, object]:
        """Per layer and modality: tokens, assignments and share per expert, mean router entropy (nats),
        dropped fraction at ``capacity_factor``, never-chosen and rare experts; per class (labelled data):
        each class's share of assignments per expert."""
        layers = {}
        for name, t in self.tallies.items():
            E = t.assign_ME.shape[1]
            report: Dict[str, object] = {}
            for m, modality in MODALITY_NAMES.items():
                if t.tokens_M[m] == 0:
                    continue
                share_E = t.assign_ME[m] / t.assign_ME[m].sum().clamp_min(1)
                # Soft MoE: slot weights (floats), not counts
                assignments = t.assign_ME[m].tolist() if t.soft else t.assign_ME[m].long().tolist()
                report[modality] = {
                    "tokens": int(t.tokens_M[m]), "assignments": assignments,
                    "unit": "slot_weight" if t.soft else "assignments",
                    "share": share_E.tolist(), "router_entropy": float(t.entropy_M[m] / t.tokens_M[m]),
                    "dropped_fraction": float(t.dropped_M[m] / t.selected_M[m].clamp_min(1)),
                    "never_chosen": [e for e in range(E) if t.assign_ME[m, e] == 0],
                    "rare": [e for e in range(E) if 0 < share_E[e] < RARE_SHARE / E]}
                if self.num_classes:
                    per_class = t.class_assign_MCE[m]
                    report[modality]["class_share"] = (per_class / per_class.sum(1, keepdim=True).clamp_min(1)).tolist()
            total_E = t.assign_ME.sum(0)
            report["image_fraction"] = (t.assign_ME[0] / total_E.clamp_min(1)).tolist()
            report["never_chosen"] = [e for e in range(E) if total_E[e] == 0]
            layers[name] = report
        return {"capacity_factor": self.capacity_factor, "samples": self.samples,
                "classes": list(class_names), "layers": layers}


def save_plots(summary: Dict[str, object], out_dir: str) -> List[str]:
    """Heatmaps of ``summary`` as PNGs in ``out_dir``; returns their paths.

    expert_share.png: layers x experts, the share of each modality's assignments (one panel per modality);
    modality_split.png: layers x experts, the fraction of an expert's tokens that are image tokens;
    class_preference_<layer>.png (labelled data): classes x experts, each class's share, image tokens.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    layers = summary["layers"]
    names = list(layers)
    paths = []
    modalities = [m for m in MODALITY_NAMES.values() if any(m in layers[n] for n in names)]

    def heatmap(ax, rows, labels, title, cmap, vmin=0.0, vmax=None, xlabel="expert"):
        import numpy as np

        data = np.array(rows, dtype=float)
        colours = plt.get_cmap(cmap).with_extremes(bad="#e0e0e0")  # a layer this modality never reaches
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=colours, vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xticks(range(data.shape[1]))
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        if data.size <= 400:  # values in the cells, in black or white by the cell's brightness
            for (i, j), v in np.ndenumerate(data):
                if np.isfinite(v):
                    r, g, b, _ = colours(im.norm(v))
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
        return im

    fig, axes = plt.subplots(1, len(modalities), figsize=(5 * len(modalities), 0.5 * len(names) + 2), squeeze=False)
    for ax, modality in zip(axes[0], modalities):
        rows = [layers[n][modality]["share"] if modality in layers[n]
                else [float("nan")] * len(layers[n]["image_fraction"]) for n in names]
        fig.colorbar(heatmap(ax, rows, names, f"share of {modality} assignments", "viridis"), ax=ax)
    fig.suptitle(f"Expert load per layer ({summary['samples']} samples)")
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(out_dir, "expert_share.png")))

    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 2))
    rows = [layers[n]["image_fraction"] for n in names]
    fig.colorbar(heatmap(ax, rows, names, "fraction of each expert's tokens that are image tokens", "coolwarm",
                         0.0, 1.0), ax=ax)
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(out_dir, "modality_split.png")))

    classes = summary.get("classes") or []
    for name in names:
        report = layers[name].get("image") or layers[name].get("text")
        if not classes or not report or "class_share" not in report:
            continue
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(classes) + 2))
        modality = "image" if "image" in layers[name] else "text"
        fig.colorbar(heatmap(ax, report["class_share"], classes, f"{name}: expert share per class ({modality} tokens)",
                             "magma"), ax=ax)
        fig.tight_layout()
        paths.append(_save(fig, os.path.join(out_dir, f"class_preference_{name}.png")))
    return paths


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
