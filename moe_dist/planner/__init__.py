"""Cluster planner (``moe-dist plan``): what a run needs before it is launched.

    params.py     model facts: parameter counts, FLOPs, MoE layers, DeepSpeed's optimizer groups
    memory.py     per-GPU bytes: parameters, gradients and optimizer states as DeepSpeed lays them out
                  (exact), transient buffers, and an activation estimate
    comm.py       bytes sent per step: MoE all-to-all (per layer, intra / inter node), gradient
                  reduction, the contrastive embedding all-gather
    step_time.py  hardware figures and the predicted step time
    layouts.py    one layout's estimate, and the ranked table of layouts that fit
"""

from .comm import Cluster
from .layouts import Layout, check_layout, estimate, plan, rank_layouts
from .memory import StateBytes, activation_bytes, state_bytes
from .params import ModelFacts, ParamGroup, model_facts
from .step_time import Hardware

__all__ = ["Cluster", "Hardware", "Layout", "ModelFacts", "ParamGroup", "StateBytes", "activation_bytes",
           "check_layout", "estimate", "model_facts", "plan", "rank_layouts", "state_bytes"]
