"""``moe-dist analyze-routing``: per layer and expert, the share of image and text tokens, per-class expert
preference (labelled data), router entropy, the dropped fraction at a chosen capacity, and the experts
that are never or almost never chosen; heatmaps as PNG and a JSON summary.

    moe-dist analyze-routing --checkpoint PATH --data SPEC --out DIR [--capacity-factor 1.0]
                             [--classes FILE] [--label-key label] [--batch 64] [--max-samples N]
"""

from __future__ import annotations

import argparse
import os

from ..config import finite_float


def analyze(checkpoint: str, data: str, out_dir: str, capacity_factor: float = 1.0, classes: str = "",
            label_key: str = "label", batch_size: int = 64, max_samples: int = 0, allow_pipe: bool = False):
    """Run the model over ``data`` once (dropless routing, one process) and write routing.json and the
    PNGs into ``out_dir``; returns (summary dict, PNG paths)."""
    import torch

    from ..data.evalset import EvalSet, default_eval_transform, eval_batches
    from ..data.urls import shown_spec
    from ..evaluation.routing import RoutingProbe, save_plots
    from ..models.moe_blocks import eval_routing
    from ..evaluation.zeroshot import load_classes, resolve_labels
    from ..files import atomic_json
    from ..models import load_pretrained
    from ..models.moe_blocks import collect_moe_outputs

    if capacity_factor <= 0 or batch_size < 1 or max_samples < 0:
        raise ValueError(f"--capacity-factor ({capacity_factor}) must be > 0, --batch ({batch_size}) >= 1 and "
                         f"--max-samples ({max_samples}) >= 0")
    model, tokenizer = load_pretrained(checkpoint, ep_size=1, dtype=torch.float32)
    class_set = load_classes(classes) if classes else None
    evalset = EvalSet(data, default_eval_transform(model.cfg.vision.image_size), tokenizer, batch_size,
                      allow_pipe=allow_pipe)
    probe = RoutingProbe(model, len(class_set.names) if class_set else 0, capacity_factor)
    with eval_routing(model, dropless=True), torch.no_grad(), probe:
        for batch in eval_batches(evalset):
            B = len(batch.captions)
            if B == 0:
                continue
            if max_samples and probe.samples + B > max_samples:
                B = max_samples - probe.samples
                if B <= 0:
                    break
            labels = None
            if class_set is not None:
                raw = [m.get(label_key) for m in batch.metadata[:B]]
                labels = resolve_labels(raw, batch.keys[:B].tolist(), class_set, label_key)
            probe.set_batch(B, labels)
            model(batch.images[:B], batch.tokens[:B])
            collect_moe_outputs(model, batch.images)  # drop the layers' kept outputs
    if probe.samples == 0:
        raise ValueError(f"no sample of {shown_spec(data)!r} could be read; check it with moe-dist-data validate")
    summary = probe.summary(class_set.names if class_set else ())
    summary.update(checkpoint=checkpoint, data=shown_spec(data))  # a record: never a token
    os.makedirs(out_dir, exist_ok=True)
    atomic_json(os.path.join(out_dir, "routing.json"), summary, durable=False)
    return summary, save_plots(summary, out_dir)


def _run(args: argparse.Namespace) -> int:
    from ..moe import MODALITY_NAMES

    summary, paths = analyze(args.checkpoint, args.data, args.out, args.capacity_factor, args.classes,
                             args.label_key, args.batch, args.max_samples, args.allow_pipe)
    print(f"routing of {summary['samples']} samples, capacity factor {summary['capacity_factor']:g}")
    print(f"  {'layer':12s} {'modality':8s} {'tokens':>9s} {'entropy':>8s} {'dropped':>8s}  never / rarely chosen")
    for layer, report in summary["layers"].items():
        for modality in MODALITY_NAMES.values():  # image, text, cross (a CoCa decoder's tokens)
            if modality in report:
                r = report[modality]
                print(f"  {layer:12s} {modality:8s} {r['tokens']:9d} {r['router_entropy']:8.3f} "
                      f"{r['dropped_fraction']:8.3f}  {r['never_chosen'] or '-'} / {r['rare'] or '-'}")
    print(f"wrote {os.path.join(args.out, 'routing.json')} and {len(paths)} PNGs in {args.out}")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze-routing", help="which experts each modality and class use: JSON summary + heatmaps",
                       description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint root, one step directory, or an export")
    p.add_argument("--data", required=True, help="shard spec to route (brace pattern, tars, shard directories)")
    p.add_argument("--out", required=True, help="directory for routing.json and the PNGs")
    p.add_argument("--capacity-factor", type=finite_float, default=1.0,
                   help="report what this capacity factor would drop (routing itself runs dropless; default 1.0)")
    p.add_argument("--classes", default="", help='JSON {"classes": [...]} naming the labels: per-class preference')
    p.add_argument("--label-key", default="label", help="metadata key of a sample's class (default: label)")
    p.add_argument("--batch", type=int, default=64, help="samples per forward (default: 64)")
    p.add_argument("--max-samples", type=int, default=0, help="stop after this many samples (0: all)")
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs (they run shell commands)")
    p.set_defaults(func=_run)
