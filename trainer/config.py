"""gpt-neox YAML configs, parsed once into typed dataclasses: one per concern, derived values in __post_init__.

Keys keep gpt-neox's names (`num_layers`, `optimizer: {type, params: {lr, betas, eps}}`, `zero_optimization`,
...; `-` and `_` alike), so a gpt-neox user's config loads here. Unknown keys are listed in one warning; a value
of the wrong type is an error naming its key. Precedence: --set KEY=VALUE > the file > the defaults.
"""

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pile_tools.components import SPLITS
from trainer.config_keys import (
    ARCHITECTURE,
    ELSEWHERE,
    FIXED,
    NESTED,
    SWITCHES,
    WHY_FIXED,
    ConfigError,
    accepted,
    apply_overrides,
    check_type,
    flatten,
    read_config_file,
    refuse_other_architectures,
)
from trainer.model import ModelConfig, check_at_least


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam(W) and the learning-rate schedule, in gpt-neox's keys (optimizer.params, warmup, ...)."""

    type: str = "Adam"
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None
    warmup: float = 0.01  # a fraction of lr_decay_iters, as in gpt-neox
    gradient_clipping: float = 1.0

    def __post_init__(self):
        # gpt-neox's "Adam" is decoupled-weight-decay Adam (apex FusedAdam, adam_w_mode): both names mean AdamW
        if self.type.lower() not in ("adam", "adamw"):
            raise ConfigError(f"optimizer.type: {self.type!r} is not supported; use Adam or AdamW")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr_decay_style: {self.lr_decay_style!r}; choose cosine, linear or constant")
        check_at_least(self, 0, "lr", "min_lr", "weight_decay", "warmup", "gradient_clipping", "eps")
        check_at_least(self, 1, "lr_decay_iters")


@dataclass(frozen=True)
class ParallelConfig:
    """The layout: tensor (model_parallel_size) x pipeline x data parallel, and the ZeRO stage."""

    pipe_parallel_size: int = 1
    model_parallel_size: int = 1
    zero_stage: int = 0
    pipe_partition_method: str = "type:transformer"  # gpt-neox's key: balance blocks; or parameters, uniform
    # Megatron's: a collective waiting longer for a peer ends the run (gloo raises; NCCL's watchdog aborts the
    # process), so a lost node ends its job instead of holding it to the time limit
    distributed_timeout_minutes: float = 30.0

    def __post_init__(self):
        object.__setattr__(self, "pipe_parallel_size", self.pipe_parallel_size or 1)  # gpt-neox: 0 is one stage
        check_at_least(self, 1, "pipe_parallel_size", "model_parallel_size")
        if not self.distributed_timeout_minutes > 0:
            raise ConfigError(f"distributed_timeout_minutes: more than 0, got {self.distributed_timeout_minutes}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_optimization.stage: {self.zero_stage}; choose 0, 1, 2 or 3")
        if not (
            self.pipe_partition_method.startswith("type:") or self.pipe_partition_method in ("parameters", "uniform")
        ):
            raise ConfigError(
                f"pipe_partition_method: {self.pipe_partition_method!r}; choose type:transformer "
                "(blocks balanced), parameters or uniform"
            )

    @property
    def pipelined(self) -> bool:
        """Tensor or pipeline parallel: the model runs as DeepSpeed's PipelineModule (trainer/pipeline.py)."""
        return self.model_parallel_size > 1 or self.pipe_parallel_size > 1


@dataclass(frozen=True)
class PrecisionConfig:
    """fp32, fp16 (with dynamic loss scaling) or bf16."""

    fp16: bool = False
    bf16: bool = False
    initial_scale_power: int = 12
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    loss_scale: float = 0.0  # 0: dynamic

    def __post_init__(self):
        if self.fp16 and self.bf16:
            raise ConfigError("fp16 and bf16: enable at most one")

    @property
    def mixed(self) -> bool:
        """fp16 or bf16."""
        return self.fp16 or self.bf16

    def blocks(self) -> dict:
        """The fp16 / bf16 blocks as DeepSpeed's JSON and gpt-neox's YAML both spell them (empty for fp32)."""
        if self.fp16:
            return {
                "fp16": {
                    "enabled": True,
                    "loss_scale": self.loss_scale,
                    "initial_scale_power": self.initial_scale_power,
                    "loss_scale_window": self.loss_scale_window,
                    "hysteresis": self.hysteresis,
                    "min_loss_scale": self.min_loss_scale,
                }
            }
        return {"bf16": {"enabled": True}} if self.bf16 else {}


@dataclass(frozen=True)
class TrainingConfig:
    """Batch, sequence, steps and the intervals of saving, evaluating and logging."""

    seq_length: int = 2048
    train_micro_batch_size_per_gpu: int = 4
    gradient_accumulation_steps: int = 1
    train_iters: int = 1000
    save_interval: int = 1000
    eval_interval: int = 1000
    eval_iters: int = 10
    log_interval: int = 10
    seed: int = 1234
    train_batch_size: int | None = None  # optional: when given, must equal micro x accumulation x DP
    exit_interval: int | None = None  # save and stop once the step is a multiple of this (gpt-neox, Megatron)
    keep_last_n_checkpoints: int | None = None  # older complete checkpoints are deleted (None: keep all)
    compile: bool | None = None  # torch.compile each block (ours): None is on with CUDA, off on a CPU
    stop_after_nonfinite_steps: int = 3  # ours: this many optimizer steps in a row with a nan/inf loss end the run
    universal_checkpoint: bool = True  # ours: each checkpoint also in DCP form, so another layout keeps Adam's state
    finetune: bool = False  # gpt-neox's: --load's weights only; step 0, a fresh optimizer, schedule and data order
    checkpoint_scale: str = "linear"  # gpt-neox's: "log" saves at steps 1, f, f^2, ... (f: save_interval) instead
    extra_save_iters: list[int] | None = None  # gpt-neox's: more steps to save at (Pythia's 0, 1, 2, 4, ..., 512)
    # The documents a sample packs (each closed by its EOD), shown to the model apart (all off: gpt-neox's default):
    eod_mask_loss: bool = False  # gpt-neox's: no loss where the input is an EOD (its target opens another document)
    reset_attention_mask: bool = False  # Megatron's: a token attends within its own document only
    reset_position_ids: bool = False  # Megatron's: rotary positions restart at 0 with each document

    @property
    def packing(self) -> bool:
        """Whether a sample's documents are shown to the model apart in any way."""
        return self.eod_mask_loss or self.reset_attention_mask or self.reset_position_ids

    def __post_init__(self):
        check_at_least(
            self,
            1,
            "seq_length",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "train_iters",
            "log_interval",
            "train_batch_size",
            "exit_interval",
            "keep_last_n_checkpoints",
            "stop_after_nonfinite_steps",
        )
        check_at_least(self, 0, "save_interval", "eval_interval", "eval_iters")
        if self.checkpoint_scale not in ("linear", "log"):
            raise ValueError(f"checkpoint_scale: 'linear' or 'log', got {self.checkpoint_scale!r}")
        if self.checkpoint_scale == "log" and self.save_interval < 2:
            raise ValueError(f"checkpoint_factor: at least 2 with checkpoint_scale: log, got {self.save_interval}")
        if any(step < 0 for step in self.extra_save_iters or []):
            raise ValueError(f"extra_save_iters: steps are at least 0, got {self.extra_save_iters}")

    def saves_at(self, step: int) -> bool:
        """Whether step `step` is saved on schedule, as gpt-neox's is_save_iter: every save_interval steps
        (checkpoint_factor), or at its powers with checkpoint_scale: log, and at extra_save_iters (0: before the
        first step). The last step and a signalled stop are saved besides."""
        if step in (self.extra_save_iters or []):
            return True
        if not self.save_interval or step == 0:
            return False
        if self.checkpoint_scale == "log":
            power = 1
            while power < step:
                power *= self.save_interval
            return power == step
        return step % self.save_interval == 0


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from, in gpt-neox's keys (trainer/samples.py reads them), and the tokenizer that
    ships with checkpoints. `data_dir` (--data) is a build-shards output; it wins over the keys."""

    data_dir: str | None = None
    data_path: str | list[str] | None = None  # a prefix, a build-shards directory, or Megatron's "w1 p1 w2 p2"
    train_data_paths: list[str] | None = None
    train_data_weights: list[float] | None = None  # None: equal weights, as in gpt-neox
    valid_data_paths: list[str] | None = None
    valid_data_weights: list[float] | None = None
    test_data_paths: list[str] | None = None
    test_data_weights: list[float] | None = None
    split: str = "969,30,1"  # train,valid,test documents of one data_path prefix, as Megatron cuts them
    weight_by_num_documents: bool = False  # gpt-neox's: each split's weights from its shards' document counts
    weighted_sampler_alpha: float = 1.0  # ... p ~ (n / N) ** alpha; 1: as many as the documents, 0: equal
    tokenizer: str | None = None  # ours: a tokenizer.json (or bundled name) to ship with checkpoints
    vocab_file: str | None = None  # gpt-neox's: with tokenizer_type HFTokenizer, that tokenizer.json
    tokenizer_type: str | None = None  # gpt-neox's (unset: its default, GPT2BPETokenizer); HFTokenizer's is a .json

    def __post_init__(self):
        for split in SPLITS:
            paths, weights = getattr(self, f"{split}_data_paths"), getattr(self, f"{split}_data_weights")
            if weights is not None and len(weights) != len(paths or []):
                raise ConfigError(f"{split}_data_weights: {len(weights)} weights for {len(paths or [])} paths")
        if self.vocab_file and self.tokenizer_type != "HFTokenizer" and not self.tokenizer:
            kind = self.tokenizer_type or "GPT2BPETokenizer (gpt-neox's default)"
            warnings.warn(
                f"tokenizer_type {kind}: vocab_file {self.vocab_file} is not a tokenizer.json; checkpoints ship "
                "the shards' tokenizer (or set tokenizer, or tokenizer_type: HFTokenizer)",
                stacklevel=2,
            )

    @property
    def tokenizer_file(self) -> str | None:
        """The tokenizer to ship with checkpoints, when the config names one."""
        return self.tokenizer or (self.vocab_file if self.tokenizer_type == "HFTokenizer" else None)


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps its outputs: gpt-neox's keys, each overridden by the command line's flag."""

    save: str | None = None  # checkpoints (--save)
    load: str | None = None  # the run to resume (--load)
    log_dir: str | None = None  # metrics.jsonl and loss.png (default: save)
    tensorboard_dir: str | None = None  # TensorBoard event files (default: <log_dir>/tensorboard)


@dataclass(frozen=True)
class NeoXConfig:
    """One run's whole configuration: built once by load_config(), frozen, passed section by section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    paths: RunPaths = field(default_factory=RunPaths)

    def __post_init__(self):
        if self.optimizer.lr_decay_iters is None:
            object.__setattr__(self.optimizer, "lr_decay_iters", self.training.train_iters)
        if self.model.num_attention_heads % self.parallel.model_parallel_size:
            raise ConfigError(
                f"model_parallel_size {self.parallel.model_parallel_size} does not divide "
                f"num_attention_heads {self.model.num_attention_heads}"
            )

    def data_parallel_size(self, world_size: int) -> int:
        """DP for `world_size` processes, or a ConfigError when TP x PP does not divide it."""
        per_replica = self.parallel.model_parallel_size * self.parallel.pipe_parallel_size
        if world_size % per_replica:
            raise ConfigError(
                f"world size {world_size} is not a multiple of model_parallel_size x pipe_parallel_size = {per_replica}"
            )
        return world_size // per_replica

    def world_size(self, given: int | None = None) -> int:
        """The processes of the run: `given` (--world-size), else the launcher's WORLD_SIZE, else TP x PP."""
        p = self.parallel
        return given or int(os.environ.get("WORLD_SIZE", p.model_parallel_size * p.pipe_parallel_size))

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step: micro-batch x accumulation x DP (and train_batch_size, if set, must agree)."""
        t = self.training
        dp = self.data_parallel_size(world_size)
        batch = t.train_micro_batch_size_per_gpu * t.gradient_accumulation_steps * dp
        if t.train_batch_size is not None and t.train_batch_size != batch:
            raise ConfigError(
                f"train_batch_size {t.train_batch_size} != train_micro_batch_size_per_gpu "
                f"{t.train_micro_batch_size_per_gpu} x gradient_accumulation_steps {t.gradient_accumulation_steps} "
                f"x data parallel {dp} = {batch}"
            )
        return batch


SECTIONS = {
    "optimizer": OptimizerConfig,
    "parallel": ParallelConfig,
    "precision": PrecisionConfig,
    "training": TrainingConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "paths": RunPaths,
}
DERIVED = {"padded_vocab_size"}  # computed, never set
# Keys taken as they are, and where they go; the model's own fields are named as gpt-neox names them.
FLAT = {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f.name not in DERIVED}


def build(raw: dict, device: str | None = None, flags: dict | None = None) -> NeoXConfig:
    """The typed config for a gpt-neox-style dict, built once: warns once about unknown keys, fails on wrong types
    and on values this implementation would not honour; `flags` (the command's --data, --save, --load) win over
    the dict's keys. On a CPU (`device` "cpu") fp16 falls back to fp32, with a warning: DeepSpeed refuses fp16
    there."""
    sections = {name: {} for name in SECTIONS}
    unknown = []
    flat = flatten(raw)
    refuse_other_architectures(flat)
    for key, value in flat.items():
        if key in ELSEWHERE:
            if value:
                warnings.warn(f"{key}: ignored ({ELSEWHERE[key]})", stacklevel=3)
        elif key in FIXED:
            if not accepted(key, value):
                why = WHY_FIXED.get(key, "GPT-NeoX's choice")
                raise ConfigError(f"{key}: only {FIXED[key]!r} is supported ({why}), got {value!r}")
        elif key == "bias_gelu_fusion":
            sections["model"]["gelu_approximate"] = "tanh" if check_type(key, value, bool) else "none"
        elif key in FLAT:
            cls = SECTIONS[FLAT[key]]
            sections[FLAT[key]][key] = check_type(key, value, {f.name: f.type for f in dataclasses.fields(cls)}[key])
        elif key not in SWITCHES | ARCHITECTURE:
            unknown.append(key)
    if unknown:
        warnings.warn(f"unknown config keys, ignored: {', '.join(sorted(unknown))}", stacklevel=3)
    for key, value in (flags or {}).items():
        sections[FLAT[key]][key] = value
    if device == "cpu" and sections["precision"].get("fp16"):
        warnings.warn(
            "fp16 needs a GPU and DeepSpeed refuses it on CPU: training in fp32 here "
            "(--set bf16=true for bf16, ~6x slower on CPU)",
            stacklevel=3,
        )
        sections["precision"]["fp16"] = False
    if device == "cpu" and sections["precision"].get("bf16") and sections["training"].get("compile"):
        warnings.warn(  # "conflicting declaration 'auto at_BFloat16_tmp_acc0_vec'" in the generated C++
            "compile: true with bf16 on a CPU: Inductor's C++ kernels for this model fail to build in bf16 "
            "(torch 2.13), training uncompiled here",
            stacklevel=3,
        )
        sections["training"]["compile"] = False
    try:
        parts = {name: SECTIONS[name](**values) for name, values in sections.items()}
        m, tp = parts["model"], parts["parallel"].model_parallel_size
        # padded for the configured TP degree, once: a checkpoint's shapes then stay whatever layout loads it
        multiple = m.make_vocab_size_divisible_by * tp
        parts["model"] = dataclasses.replace(m, padded_vocab_size=math.ceil(m.vocab_size / multiple) * multiple)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return NeoXConfig(**parts)


KNOWN = (
    set(FLAT)
    | SWITCHES
    | ARCHITECTURE
    | set(FIXED)
    | set(ELSEWHERE)
    | NESTED
    | {"bias_gelu_fusion", "checkpoint_factor", "precision"}
)


def load_config(
    paths: str | Path | list, overrides: list[str] = (), flags: dict | None = None, device: str | None = None
) -> NeoXConfig:
    """The one place a run's config is built: YAML files (several merge left to right, a key given twice is an
    error, as gpt-neox's deepy.py), then --set overrides, then the command's flags (`flags`: data_dir, save, load;
    None means not given), parsed once into frozen dataclasses; `device` as in build()."""
    raw: dict = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        conf = read_config_file(path)
        if twice := sorted(set(conf) & set(raw)):
            listed = ", ".join(twice[:5]) + (f" and {len(twice) - 5} more" if len(twice) > 5 else "")
            raise ConfigError(f"{path}: {listed} already set by an earlier --config file")
        raw.update(conf)
    raw = apply_overrides(raw, list(overrides), KNOWN)
    return build(raw, device, {k: str(v) for k, v in (flags or {}).items() if v is not None})


def to_yaml_dict(config: NeoXConfig) -> dict:
    """The config back in gpt-neox's key names (what checkpoints store)."""
    m, o, p, pr, t = config.model, config.optimizer, config.parallel, config.precision, config.training
    out = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in ("gelu_approximate", *DERIVED)}
    out["bias_gelu_fusion"] = m.gelu_approximate == "tanh"
    out.update({f.name: getattr(t, f.name) for f in dataclasses.fields(t)})
    out.update(
        pipe_parallel_size=p.pipe_parallel_size,
        model_parallel_size=p.model_parallel_size,
        pipe_partition_method=p.pipe_partition_method,
        distributed_timeout_minutes=p.distributed_timeout_minutes,
        zero_optimization={"stage": p.zero_stage},
        optimizer={"type": o.type, "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps}},
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        lr_decay_style=o.lr_decay_style,
        lr_decay_iters=o.lr_decay_iters,
        warmup=o.warmup,
        gradient_clipping=o.gradient_clipping,
    )
    out.update(pr.blocks())
    data = {k: v for k, v in dataclasses.asdict(config.data).items() if v is not None and k != "data_dir"}
    return {**out, **data}  # not the run's paths: a checkpoint's config must not point a new run at old outputs
