"""``moe-dist eval``: zero-shot classification, image-text retrieval and contrastive loss of a checkpoint.

Runs as one process or under torchrun / the deepspeed launcher / srun (every sample once over all ranks;
every rank computes the same metrics, rank 0 prints and writes them).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List

from .caption import add_generation_flags, generation_config

TASK_NAMES = "zeroshot|retrieval|loss|caption|vqa"  # the names evaluation.tasks.TASKS checks; no heavy import for --help


def default_tasks(args: argparse.Namespace) -> List[str]:
    """Retrieval and loss always; zero-shot too when a class file is given and the data has labels."""
    from ..data.evalset import first_metadata

    tasks = ["retrieval", "loss"]
    if args.classes and args.label_key in first_metadata(args.data, args.allow_pipe):
        tasks.insert(0, "zeroshot")
    return tasks


def print_table(result, args: argparse.Namespace, tasks: List[str]) -> None:
    from ..data.urls import shown_spec

    samples = result.groups["samples"]
    print(f"eval of {args.checkpoint} on {shown_spec(args.data)}: {samples['evaluated']} samples "
          f"({samples['failed']} failed), {samples['ranks']} rank(s), tasks {', '.join(tasks)}, "
          f"{'capacity' if args.capacity else 'dropless'} routing")
    for group, values in result.groups.items():
        if group == "samples":
            continue
        if group == "caption" and "constant_token_f1" in values:
            from ..evaluation.caption_baselines import caption_table

            print(caption_table(values))
            continue
        print(group)
        for key, value in values.items():
            if isinstance(value, float):
                print(f"  {key:28s} {value:10.4f}")
            elif isinstance(value, int):
                print(f"  {key:28s} {value:10d}")
    if samples["failures"]:
        print("failures: " + ", ".join(f"{n} {reason}" for reason, n in sorted(samples["failures"].items())))


def _run(args: argparse.Namespace) -> int:
    import torch
    from deepspeed.accelerator import get_accelerator

    from ..data.urls import shown_spec
    from ..distributed import detect_env, init_distributed
    from ..evaluation import evaluate, parse_tasks, save_confusion_png
    from ..files import atomic_json
    from ..models import load_pretrained

    if args.workers < 0:
        raise ValueError(f"--workers {args.workers} must be >= 0")
    tasks = parse_tasks(args.task) if args.task else default_tasks(args)
    if args.confusion_png and "zeroshot" not in tasks:
        raise ValueError("--confusion-png needs the zeroshot task (--task zeroshot and --classes FILE)")
    for out in (args.json, args.confusion_png):  # fail now, not after the whole pass
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    env = detect_env()
    if env.world_size > 1:
        init_distributed(env)
    accelerator = get_accelerator()
    device = "cpu" if accelerator.device_name() == "cpu" else accelerator.device_name(env.local_rank)
    generation = generation_config(args) if "caption" in tasks else None
    pool = None
    if "caption" in tasks and args.caption_pool:
        from ..evaluation.caption_baselines import read_caption_pool

        pool = read_caption_pool(args.caption_pool, args.caption_pool_size, args.allow_pipe)
    model, tokenizer = load_pretrained(args.checkpoint, ep_size=1)
    model.to(device)
    try:
        result = evaluate(model, tokenizer, args.data, tasks, batch_size=args.batch, classes=args.classes,
                          rank=env.rank, world_size=env.world_size, dropless=not args.capacity,
                          allow_pipe=args.allow_pipe, label_key=args.label_key,
                          progress=not args.no_progress and sys.stderr.isatty(), workers=args.workers,
                          caption_pool=pool, generation=generation)
    finally:
        if env.world_size > 1:
            torch.distributed.destroy_process_group()
    if env.rank != 0:
        return 0
    print_table(result, args, tasks)
    if "caption" in tasks and not args.caption_pool:
        print("caption baselines (best constant caption, retrieval captioning): give --caption-pool SPEC, the "
              "training captions")
    if args.json:
        atomic_json(args.json, {"checkpoint": args.checkpoint, "data": shown_spec(args.data), "tasks": tasks,
                                "dropless": not args.capacity, **result.to_json()}, durable=False)
        print(f"wrote {args.json}")
    if args.confusion_png:
        save_confusion_png(result.confusion, result.class_names, args.confusion_png)
        print(f"wrote {args.confusion_png}")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="zero-shot accuracy, retrieval recall and loss of a checkpoint",
                       description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a run's checkpoint root (its newest complete checkpoint), one step directory, or an "
                        "exported .safetensors file")
    p.add_argument("--data", required=True, help="shard spec of the eval set (brace pattern, .tar, shard directory)")
    p.add_argument("--task", action="append", default=[], metavar="TASK",
                   help=f"{TASK_NAMES}; repeatable or a comma list (default: retrieval and loss, plus zeroshot "
                        "when --classes is given and the samples carry labels)")
    p.add_argument("--classes", metavar="FILE",
                   help='zero-shot class names and templates: JSON {"classes": [...], "templates": [...]} '
                        "(default with --task zeroshot: open_clip's ImageNet classes and templates)")
    p.add_argument("--label-key", default="label",
                   help="the samples' JSON metadata key holding the class: an index into the classes or a name")
    p.add_argument("--json", metavar="OUT", help="write the metrics as JSON (open_clip key names per task)")
    p.add_argument("--confusion-png", metavar="OUT", help="save the zero-shot confusion matrix as a PNG")
    p.add_argument("--batch", type=int, default=64, help="samples per forward (default 64)")
    p.add_argument("--workers", type=int, default=2, help="data worker processes per rank (default 2)")
    p.add_argument("--capacity", action="store_true",
                   help="route with the model's eval capacity instead of dropless, and report the dropped fraction")
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs (they run shell commands)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--caption-pool", metavar="SPEC",
                   help="caption task: shard spec of the training captions; reports the best constant caption "
                        "(chosen in hindsight) and retrieval captioning beside the model's scores")
    p.add_argument("--caption-pool-size", type=int, default=10000,
                   help="caption task: distinct pool captions read, in spec order (default 10000)")
    add_generation_flags(p, max_length=30, batch=False, recipe=True)
    p.set_defaults(func=_run)

