"""The run config: typed sections loaded from YAML, ``--set a.b=c`` overrides, validated before any
process group starts; the DeepSpeed config is generated from it (batch sizes are stated once)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from ..config import from_dict, load_yaml, merge, parse_overrides

PRECISIONS = ("fp32", "bf16", "fp16")
SEED_BOUND = 2 ** 32


def _at_least(section: object, where: str, minimum: float, *names: str) -> None:
    """ValueError naming the first field of ``section`` below ``minimum``."""
    for name in names:
        value = getattr(section, name)
        if not value >= minimum:  # (NaN fails this test too)
            raise ValueError(f"{where}{name}={value} must be >= {minimum}")


@dataclass
class ModelSection:
    name: str = "moe-clip-tiny"  # registry name, path to a model JSON, or open_clip:ARCH (open_clip's architecture)
    overrides: Dict[str, Any] = field(default_factory=dict)  # nested model-JSON fields, e.g. {moe: {top_k: 2}}
    init: str = ""  # sparse upcycling on a fresh start: open_clip file, export, checkpoint dir or open_clip:ARCH/TAG


@dataclass
class DataSection:
    train: str = ""  # shard spec; several sources joined by "::"
    val: str = ""
    weights: List[float] = field(default_factory=list)  # per-source sample shares (resampled mode)
    mode: str = "exact"  # exact | resampled
    workers: int = 2
    tokenizer: str = ""  # sentencepiece .model path, or openclip-bpe
    shuffle_buffer: int = 1000
    epoch_samples: int = 0
    max_failure_fraction: float = 0.1
    allow_pipe: bool = False
    remote_retries: int = 5  # http(s):// and s3:// shards: reopenings in a row after a fault (reset, timeout, 5xx)
    remote_timeout_s: float = 60.0  # per connect / read; also the window of remote_min_bytes_per_s
    remote_backoff_s: float = 1.0  # first wait before a retry, doubled per retry (at most 60 s)
    remote_min_bytes_per_s: float = 65536.0  # a shard slower over remote_timeout_s of waiting is reopened; 0: no floor
    skip_unreadable_shards: bool = False  # a remote shard unreadable after its retries is skipped and counted

    def __post_init__(self) -> None:
        _at_least(self, "data.", 0, "workers", "shuffle_buffer", "epoch_samples", "remote_retries", "remote_backoff_s",
                  "remote_min_bytes_per_s")
        if not self.remote_timeout_s > 0:
            raise ValueError(f"data.remote_timeout_s={self.remote_timeout_s} must be > 0")

    def remote_options(self):
        """``RemoteOptions`` of every remote read of the run: shards, index files, evaluation."""
        from ..data import RemoteOptions

        return RemoteOptions(self.remote_retries, self.remote_timeout_s, self.remote_backoff_s,
                             self.remote_min_bytes_per_s)

    def loader_config(self, split: str, batch_size: int, image_size: int, seed: int, eval_samples: int = 0):
        """The ``LoaderConfig`` of ``split``: "train" streams ``train`` with augmentation; "val" reads
        ``eval_samples`` samples (over all ranks) of ``val`` without augmentation, in one process."""
        from ..data import LoaderConfig

        common = dict(batch_size=batch_size, image_size=image_size, seed=seed, allow_pipe=self.allow_pipe,
                      max_failure_fraction=self.max_failure_fraction, remote=self.remote_options(),
                      skip_unreadable_shards=self.skip_unreadable_shards)
        if split == "train":
            return LoaderConfig(spec=self.train, mode=self.mode, weights=list(self.weights) or None,
                                workers=self.workers, shuffle_buffer=self.shuffle_buffer,
                                epoch_samples=self.epoch_samples, **common)
        return LoaderConfig(spec=self.val, mode="resampled", workers=0, train_transform=False,
                            epoch_samples=eval_samples, **common)


@dataclass
class BatchSection:
    global_batch: int = 0  # 0: micro_batch x grad_accum x data-parallel size
    micro_batch: int = 8
    grad_accum: int = 1

    def __post_init__(self) -> None:
        _at_least(self, "batch.", 0, "global_batch")
        _at_least(self, "batch.", 1, "micro_batch", "grad_accum")


@dataclass
class OptimizerSection:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.eps > 0):
            raise ValueError(f"optimizer.lr={self.lr} and optimizer.eps={self.eps} must be > 0")
        _at_least(self, "optimizer.", 0, "weight_decay")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas={self.betas} must be two numbers in [0, 1)")


@dataclass
class ScheduleSection:
    kind: str = "cosine"  # cosine | constant
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "constant"):
            raise ValueError(f"schedule.kind={self.kind!r}; use 'cosine' or 'constant'")
        _at_least(self, "schedule.", 0, "warmup_steps")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")


@dataclass
class CheckpointSection:
    dir: str = ""  # default: <output_dir>/checkpoints
    every: int = 0  # optimizer steps; 0 = only at the end and on signals
    keep: int = 2

    def __post_init__(self) -> None:
        _at_least(self, "checkpoint.", 0, "every")
        if self.keep < 2:
            raise ValueError(f"checkpoint.keep={self.keep}: keep checkpoint.keep >= 2 (never keep fewer than two)")


@dataclass
class LoggingSection:
    every: int = 1
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _at_least(self, "logging.", 1, "every")


@dataclass
class DecodingSection:
    """How the ``caption`` eval task decodes (``moe-dist caption``'s and ``eval``'s flags of the same names,
    whose defaults these are). The defaults are the captioning study's best (docs/results.md): beam search
    over 5 beams, the finished beams reranked by the contrastive towers; ``strategy: greedy`` is 3-5x
    cheaper."""

    strategy: str = "beam"  # greedy, beam
    max_length: int = 30  # most generated tokens, EOS included
    beam_width: int = 5  # beams per image (strategy beam)
    length_penalty: float = 1.0  # beam: rank finished beams by logprob / length ** this
    repetition_penalty: float = 1.0  # >= 1: multiply the log-probability of tokens already generated by this
    min_length: int = 0  # generated tokens before the EOS may come
    rerank: float = 3.0  # beam: rescore finished beams by + this x image-caption cosine of the contrastive towers

    def __post_init__(self) -> None:
        if self.strategy not in ("greedy", "beam"):
            raise ValueError(f"eval.decoding.strategy={self.strategy!r} is unknown; use greedy or beam")
        if self.strategy != "beam" and self.rerank:
            raise ValueError(f"eval.decoding.rerank={self.rerank:g} reranks finished beams: it needs strategy beam "
                             "(set eval.decoding.rerank=0 with greedy)")
        try:
            self.generation()
        except ValueError as err:
            raise ValueError(f"eval.decoding: {err}") from None

    def generation(self):
        from ..generation import GenerationConfig

        return GenerationConfig(strategy=self.strategy, max_new=self.max_length, beam_width=self.beam_width,
                                length_penalty=self.length_penalty, repetition_penalty=self.repetition_penalty,
                                min_length=self.min_length, rerank=self.rerank)


@dataclass
class EvalSection:
    """Evaluation of ``data.val`` (a full pass, every sample once over all ranks, dropless routing) with
    the code of ``moe-dist eval``; metrics go to TensorBoard and metrics.jsonl as val/<task>/<metric>."""

    every: int = 0  # optimizer steps; 0 = at the end only (if data.val is set)
    tasks: List[str] = field(default_factory=lambda: ["loss"])  # loss, zeroshot, retrieval; caption, vqa (kind=coca)
    classes: str = ""  # zero-shot class file {"classes": [...], "templates": [...]}; needed for zeroshot
    label_key: str = "label"  # metadata key of a sample's class
    caption_pool: str = ""  # caption task: training captions for its baselines ("": data.train, "none": none)
    caption_pool_size: int = 10000  # the first distinct captions of caption_pool read, in spec order
    decoding: DecodingSection = field(default_factory=DecodingSection)  # how the caption task decodes

    def __post_init__(self) -> None:
        from ..evaluation.tasks import parse_tasks

        _at_least(self, "eval.", 0, "every")
        _at_least(self, "eval.", 1, "caption_pool_size")
        try:
            self.tasks = parse_tasks(self.tasks)
        except ValueError as err:
            raise ValueError(f"eval.tasks: {err}") from None
        if "zeroshot" in self.tasks and not self.classes:
            raise ValueError("eval.tasks has zeroshot but eval.classes is empty; give the class file "
                             '({"classes": [...], "templates": [...]}, e.g. the classes.json of moe-dist-data synth)')


@dataclass
class DebugSection:
    nan_loss_steps: List[int] = field(default_factory=list)  # inject a NaN loss at these micro steps
    nan_loss_rank: int = 0
    raise_at_step: int = -1  # raise an error at this micro step (>= 0) on raise_rank
    raise_rank: int = 0
    pause_in_save_s: float = 0.0  # sleep between writing a checkpoint and committing it (tests)

    def __post_init__(self) -> None:
        _at_least(self, "debug.", 0, "pause_in_save_s")


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    steps: int = 100  # optimizer steps
    seed: int = 0
    precision: str = "fp32"
    zero_stage: int = 2
    ep_size: int = 1
    zero_bucket_elements: int = 0  # ZeRO-1/2 reduce and all-gather bucket (elements); 0: the planner's choice
    grad_clip: float = 1.0
    max_nonfinite_steps: int = 5  # consecutive skipped steps before the run stops
    stop_timeout_s: float = 600.0  # after a stop signal, exit anyway if no checkpoint is done by then (0: never)
    activation_checkpointing: str = "none"  # none | blocks (recompute every block) | moe (the MoE layers only)
    compile: Union[str, bool] = "auto"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def __post_init__(self) -> None:
        _at_least(self, "", 1, "steps", "max_nonfinite_steps")
        _at_least(self, "", 0, "seed", "grad_clip", "stop_timeout_s")
        from .zero_bucket import BUCKET_ALIGNMENT

        if self.zero_bucket_elements < 0 or self.zero_bucket_elements % BUCKET_ALIGNMENT:
            raise ValueError(f"zero_bucket_elements={self.zero_bucket_elements} must be 0 (the planner's choice) or "
                             f"a positive multiple of {BUCKET_ALIGNMENT} (DeepSpeed asserts allgather_bucket_size % "
                             f"{BUCKET_ALIGNMENT} == 0); e.g. --set zero_bucket_elements="
                             f"{max(BUCKET_ALIGNMENT, self.zero_bucket_elements + 1)}")
        if self.seed >= SEED_BOUND:  # numpy and the data stream's generators take 32-bit seeds
            raise ValueError(f"seed={self.seed} must be below 2**32 ({SEED_BOUND})")
        from ..models.moe_blocks import CHECKPOINT_MODES, compile_mode

        if self.activation_checkpointing not in CHECKPOINT_MODES:
            raise ValueError(f"activation_checkpointing={self.activation_checkpointing!r} is unknown; use one of "
                             f"{CHECKPOINT_MODES}")
        if isinstance(self.compile, bool):  # configs written before the modes: true compiled the blocks
            self.compile = "blocks" if self.compile else "none"
        compile_mode(self.compile, self.activation_checkpointing)  # an unknown mode or one that cannot trace

    def validate(self, world_size: int) -> None:
        """Raise ValueError naming the field and the fix; needs only the world size."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is unknown; use one of {PRECISIONS}")
        if self.zero_stage == 3:
            raise ValueError("zero_stage=3 is refused: DeepSpeed's native MoE (expert parallelism) does not support "
                             "ZeRO stage 3 (experts must not be partitioned across the data-parallel group); "
                             "use zero_stage=1 or 2")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage={self.zero_stage} must be 0, 1 or 2")
        if self.ep_size < 1 or world_size % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide the world size {world_size}; use an ep_size "
                             f"among {[d for d in range(1, world_size + 1) if world_size % d == 0]}")
        model = self.model_config()
        self._check_openclip_tokenizer()
        # each tower's MoE layers with their own config (model.<tower>.moe.overrides over model.moe)
        towers = model.tower_moe() or {"": model.moe_config(model.vision.width, model.vision.mlp_ratio)}
        traced = self.compile in ("model", "blocks") and self.ep_size == 1  # the MoE layer inside a graph
        for tower, moe in towers.items():
            if traced and moe.expert_backend == "grouped_mm" and self.precision != "bf16":
                raise ValueError(f"compile={self.compile} traces {model.moe_key(tower, 'expert_backend')}=grouped_mm "
                                 "in bf16 only (the meta kernel of torch._grouped_mm), not "
                                 f"precision={self.precision}; set precision=bf16, or expert_backend=auto or loop, or "
                                 "compile=none")
            if moe.num_experts % self.ep_size:
                raise ValueError(f"ep_size={self.ep_size} must divide {model.moe_key(tower, 'num_experts')}="
                                 f"{moe.num_experts}")
        b = self.batch
        expected = b.micro_batch * b.grad_accum * world_size
        if b.global_batch and b.global_batch != expected:
            raise ValueError(f"batch.global_batch={b.global_batch} != batch.micro_batch ({b.micro_batch}) x "
                             f"batch.grad_accum ({b.grad_accum}) x data-parallel size ({world_size}) = {expected}; "
                             "set global_batch to 0 (derived) or adjust micro_batch/grad_accum")
        if not self.data.train:
            raise ValueError("data.train is empty; give a shard spec (e.g. --set data.train=datasets/synth/train)")
        sources = [x for x in self.data.train.split("::") if x.strip()]
        if self.data.weights and (len(self.data.weights) != len(sources) or min(self.data.weights) <= 0):
            raise ValueError(f"data.weights={self.data.weights} must give one positive weight per source of "
                             f"data.train ({len(sources)} sources joined by '::')")
        self.data.loader_config("train", b.micro_batch, model.vision.image_size, self.seed)  # mode, workers, ...

    def check_inputs(self, resume: str = "auto") -> None:
        """Resolve every input the run will open (shard specs, tokenizer, a resume path) now, so that a
        wrong path fails before the first step instead of at the final evaluation."""
        from ..data import resolve_spec
        from ..text import get_tokenizer
        from . import checkpoint

        d = self.data
        pool = self.eval.caption_pool if "caption" in self.eval.tasks and self.eval.caption_pool != "none" else ""
        for name, spec in (("data.train", d.train), ("data.val", d.val), ("eval.caption_pool", pool)):
            if not spec:
                continue
            try:
                resolve_spec(spec, list(d.weights) or None if name == "data.train" else None, d.allow_pipe,
                             need_counts=False, options=d.remote_options())
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        text = self.model_config().text
        self._check_openclip_tokenizer()
        try:
            tokenizer = get_tokenizer(d.tokenizer or text.tokenizer, text.context_length)
        except ValueError as err:
            raise ValueError(f"data.tokenizer: {err}") from None
        if self.eval.classes and not os.path.isfile(self.eval.classes):
            what = "is not a regular file" if os.path.exists(self.eval.classes) else "does not exist"
            raise ValueError(f"eval.classes: {self.eval.classes!r} {what}")
        if "zeroshot" in self.eval.tasks and d.val:  # labels that do not fit the classes fail now, not at the end
            from ..data.evalset import first_metadata
            from ..evaluation.zeroshot import load_classes, resolve_labels

            label = first_metadata(d.val, d.allow_pipe, d.remote_options()).get(self.eval.label_key)
            try:
                resolve_labels([label], [(0, 0)], load_classes(self.eval.classes), self.eval.label_key)
            except ValueError as err:
                raise ValueError(f"eval.classes / data.val: {err}") from None
        if checkpoint.find_resume(self.checkpoint_dir, resume) is None and self.model.init:  # a resume ignores it
            from ..models.upcycle import check_init

            check_init(self.model.init, self.model_config())
        # ids past the embedding table would fail at the first step (checked after model.init, whose errors say more)
        if tokenizer.vocab_size > text.vocab_size:
            raise ValueError(f"data.tokenizer={d.tokenizer or text.tokenizer!r} has {tokenizer.vocab_size} tokens but "
                             f"model.text.vocab_size is {text.vocab_size}; use a tokenizer of at most that many "
                             f"tokens, or set --set model.overrides.text.vocab_size={tokenizer.vocab_size}")

    def _check_openclip_tokenizer(self) -> None:
        """open_clip:ARCH (model.name or model.init) means open_clip's BPE ids: refuse another data.tokenizer,
        which would feed its ids to the BPE embeddings (e.g. a sentencepiece path from a base YAML)."""
        from ..models.openclip_arch import is_openclip

        key = "model.name" if is_openclip(self.model.name) else "model.init" if is_openclip(self.model.init) else ""
        if key and self.data.tokenizer not in ("", "openclip-bpe"):
            raise ValueError(f"data.tokenizer={self.data.tokenizer!r} replaces the openclip-bpe tokenizer of "
                             f"{key}={getattr(self.model, key.split('.')[1])}, whose text embeddings take open_clip's "
                             "BPE ids; set --set data.tokenizer=openclip-bpe (or leave it empty)")

    def model_config(self):
        from ..models import load_model_config

        return load_model_config(self.model.name, self.model.overrides)

    @property
    def checkpoint_dir(self) -> str:
        import os

        return self.checkpoint.dir or os.path.join(self.output_dir, "checkpoints")

    def global_batch(self, world_size: int) -> int:
        return self.batch.micro_batch * self.batch.grad_accum * world_size

    def clips_in_trainer(self) -> bool:
        """ZeRO-0 fp32 runs clip gradients in the trainer (``engine.optim.clip_grad_norm``): DeepSpeed's
        own clipping on that path takes a norm per parameter: 460 of the 1,574 top-level operators of a
        step of bench.train_throughput's dense model. ZeRO-1/2 (flat partitions) and bf16/fp16 (their
        optimizers clip master gradients) keep DeepSpeed's."""
        return self.zero_stage == 0 and self.precision == "fp32" and self.grad_clip > 0

    def deepspeed_config(self, world_size: int, trainer_clips: bool = False) -> Dict[str, Any]:
        """The DeepSpeed config of this run. ``trainer_clips``: the caller clips gradients itself
        (``clips_in_trainer``), so DeepSpeed's ``gradient_clipping`` is 0."""
        bucket = self.zero_bucket_size()
        return {
            "train_batch_size": self.global_batch(world_size),
            "train_micro_batch_size_per_gpu": self.batch.micro_batch,
            "gradient_accumulation_steps": self.batch.grad_accum,
            "gradient_clipping": 0.0 if trainer_clips else self.grad_clip,
            "zero_optimization": {"stage": self.zero_stage, "reduce_bucket_size": bucket,
                                  "allgather_bucket_size": bucket},
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16", "initial_scale_power": 12},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }

    def zero_bucket_size(self) -> int:
        """ZeRO-1/2's reduce / all-gather bucket (elements): ``zero_bucket_elements``, or when 0 the
        planner's choice for one rank's tensors at this ep_size (``engine.zero_bucket.planned_bucket_elements``:
        the largest tensor, or 1/16 of the parameters if more, at most DeepSpeed's default 5e8). A bucket
        as large as the model is allocated afresh every backward and undoes what ZeRO partitions
        (bench/memory.py measured it)."""
        if self.zero_bucket_elements:
            return self.zero_bucket_elements
        import torch

        from ..models import build_model
        from .zero_bucket import planned_bucket_elements

        with torch.device("meta"):  # at ep_size 1 (no process group); a rank holds 1/ep_size of each expert tensor
            model = build_model(self.model_config())
        expert = [getattr(p, "allreduce", True) is False for p in model.parameters()]
        return planned_bucket_elements([p.numel() // self.ep_size if e else p.numel()
                                        for p, e in zip(model.parameters(), expert)])

    def to_dict(self) -> Dict[str, Any]:
        """The config as a run records it (run_config.json in the run directory and every checkpoint):
        shard specs are shown without query strings (presigned tokens), which are never written."""
        from ..data.urls import shown_spec

        recorded = dataclasses.asdict(self)
        for name in ("train", "val"):
            recorded["data"][name] = shown_spec(recorded["data"][name])
        return recorded


def load_run_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> RunConfig:
    """YAML file (optional) + ``--set`` overrides -> RunConfig (not yet validated against a world size)."""
    data: Dict[str, Any] = {}
    if path:
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"run config {path!r} must be a YAML mapping")
    changes = parse_overrides(overrides or [])
    return from_dict(RunConfig, merge(_normalize_model(data), _normalize_model(changes)), "run config")


def _normalize_model(data: Dict[str, Any]) -> Dict[str, Any]:
    """Model-JSON fields may sit directly under ``model`` (model.moe.top_k=2): move them to overrides."""
    model = data.get("model")
    if not isinstance(model, dict):
        return data
    own = ("name", "overrides", "init")  # ModelSection's fields
    extra = {k: v for k, v in model.items() if k not in own}
    if not extra:
        return data
    kept = {k: v for k, v in model.items() if k in own}
    kept["overrides"] = merge(kept.get("overrides", {}), extra)
    return {**data, "model": kept}
