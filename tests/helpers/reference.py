"""A naive per-token implementation of y = sum_{i in S(x)} g_i(x) f_i(x), written independently of
moe_dist.moe (python loops, no sorting or scatter), used as the fp64 reference in tests.

Drop semantics implemented here (the documented contract of CapacityDrop): walk slot 0 of every
token in priority order, then slot 1, ...; an assignment is kept while its expert has taken fewer
than `capacity` assignments.
"""

import math

import torch
import torch.nn.functional as F

ACT = {"gelu": F.gelu, "relu": F.relu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
       "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h)}


def _router_logits(layer, x):
    proj = layer.router.proj
    if isinstance(proj, torch.nn.Linear):
        return proj.weight @ x
    lin1, lin2 = proj[0], proj[2]
    return lin2.weight @ F.gelu(lin1.weight @ x + lin1.bias) + lin2.bias


def _select(cfg, probs):
    """Sorted expert ids (descending probability) a token is routed to, per the router rules."""
    order = sorted(range(len(probs)), key=lambda e: -float(probs[e].detach()))
    if cfg.router == "topk":
        return order[: cfg.top_k]
    chosen, mass = [], 0.0
    for e in order[: cfg.max_k]:
        if chosen and cfg.router == "threshold" and float(probs[e].detach()) < cfg.threshold:
            break
        if chosen and cfg.router == "top_p" and mass >= cfg.top_p:
            break
        chosen.append(e)
        mass += float(probs[e].detach())
    return chosen


def _expert(layer, e, x):
    ex = layer.experts
    h = x @ ex.w1[e] + (ex.b1[e] if ex.b1 is not None else 0)
    if layer.config.activation == "swiglu":
        g, u = h.chunk(2)
        h = F.silu(g) * u
    else:
        h = ACT[layer.config.activation](h)
    return h @ ex.w2[e] + (ex.b2[e] if ex.b2 is not None else 0)


def reference_forward(layer, x_TD, modality_T=None, padding_T=None, token_order=None):
    """Per-token loop over a single-process (ep_size=1) layer's own parameters.

    Args:
        token_order: priority order of tokens for capacity drops (defaults to position order).
    Returns:
        (y [T, D], kept: list of (token, expert) pairs).
    """
    cfg = layer.config
    T, E = x_TD.shape[0], cfg.num_experts
    n_img, n_txt = cfg.modality_experts
    real = [t for t in range(T) if padding_T is None or not bool(padding_T[t])]
    routes = {}
    for t in real:
        logits = _router_logits(layer, x_TD[t])
        if cfg.uses_modality:
            forbidden = range(n_img, n_img + n_txt) if int(modality_T[t]) == 0 else range(0, n_img)
            logits = torch.stack([torch.tensor(-math.inf, dtype=logits.dtype) if e in forbidden else logits[e]
                                  for e in range(E)])
        probs = torch.softmax(logits, 0)
        chosen = _select(cfg, probs)
        gates = [probs[e] for e in chosen]
        if cfg.renormalize:
            total = sum(gates)
            gates = [g / total for g in gates]
        routes[t] = list(zip(chosen, gates))

    kept = set()
    if cfg.dropless:
        kept = {(t, e) for t in real for e, _ in routes[t]}
    else:
        factor = cfg.capacity_factor if layer.training else cfg.eval_capacity_factor
        capacity = max(cfg.min_capacity, math.ceil(factor * len(real) * cfg.experts_per_token / E))
        load = [0] * E
        order = list(range(T)) if token_order is None else [int(t) for t in token_order]
        for slot in range(cfg.experts_per_token):
            for t in order:
                if t in routes and slot < len(routes[t]):
                    e = routes[t][slot][0]
                    if load[e] < capacity:
                        load[e] += 1
                        kept.add((t, e))

    rows = []
    for t in range(T):
        y = torch.zeros_like(x_TD[t])
        for e, g in routes.get(t, []):
            if (t, e) in kept:
                y = y + g * _expert(layer, e, x_TD[t])
        if layer.shared_mlp is not None and t in routes:
            y = y + layer.shared_mlp(x_TD[t])
        rows.append(y)
    return torch.stack(rows), kept


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn()`` runs, parameters excluded."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
