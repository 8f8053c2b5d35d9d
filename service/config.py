"""Typed run configuration: one tree loaded from YAML plus dotted overrides.

Every field is validated before any worker starts. Errors name the field, the
value and the fix. The config is data: YAML is read with a ``yaml.SafeLoader``
subclass and no field is ever evaluated as code.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.schedule import SCHEDULE_NAMES

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
DType = Literal["float32", "bfloat16", "float16"]

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class ConfigError(ValueError):
    """Invalid configuration, raised before any worker starts."""


class Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field("stalwart-demo", pattern=RUN_NAME_PATTERN, description="Run name; a run with committed checkpoints in storage resumes.")
    seed: int = Field(1234, description="Seed for weight init, data order and per-rank RNG streams.")
    max_failures: NonNegativeInt = Field(3, description="Worker-group restarts Ray Train allows before the run fails.")
    record_samples: bool = Field(
        False, description="Test mode: store the sample indices every rank trained on in the step history (one gather per step)."
    )


class StorageSection(Section):
    uri: str = Field("./stalwart-runs", description="Root for datasets and runs: a local path or an fsspec URI such as s3://bucket/prefix.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options, for example {endpoint_url: ..., client_kwargs: {region_name: ...}}. "
        "Put credentials in the standard AWS environment variables, not here.",
    )


class ModelSection(Section):
    n_layers: PositiveInt = 4
    dim: PositiveInt = 256
    n_heads: PositiveInt = 8
    n_kv_heads: PositiveInt | None = Field(None, description="Key/value heads for grouped-query attention; None means n_heads.")
    vocab_size: PositiveInt = Field(264, description="Embedding rows; at least the tokenizer's vocabulary size.")
    seq_len: PositiveInt = Field(256, description="Tokens per training sequence.")
    ffn_hidden: PositiveInt | None = Field(None, description="SwiGLU hidden width; None derives it the Llama way (8/3 x dim, rounded up to 64).")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelSection":
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; choose n_heads that divides dim")
        head_dim = self.dim // self.n_heads
        if head_dim % 2:
            raise ValueError(f"model.dim / model.n_heads = {head_dim} is odd; RoPE needs an even head dimension")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={kv}; choose n_kv_heads that divides n_heads")
        return self


class DataSection(Section):
    paths: list[str] | None = Field(
        None,
        description="Files or glob patterns (local or s3://) of .txt/.py/.md text, .jsonl (a 'text' field) or .parquet. "
        "None uses the Python standard library's own .py sources.",
    )
    tokenizer: str = Field("byte", description="'byte' (byte-level, no download) or a path to a Hugging Face tokenizer.json.")
    text_field: str = Field("text", description="Field holding the text in JSONL and Parquet records.")
    max_files: PositiveInt | None = Field(None, description="Use at most this many input files (sorted by path); None uses all.")
    read_retry_s: float | None = Field(
        None, gt=0, description="Seconds a read of the prepared dataset or of the run's abort marker, or a write of the step "
        "history, may keep failing on a storage error (retried with backoff) before the attempt fails. None: half the hang "
        "timeout (fault_tolerance.hang_timeout_s, or hang_timeout_floor_s when that is derived).",
    )


class TrainSection(Section):
    steps: PositiveInt = Field(200, description="Optimizer steps in the run.")
    global_batch: PositiveInt = Field(16, description="Sequences per optimizer step across all ranks.")
    micro_batch: PositiveInt = Field(4, description="Sequences per rank per forward/backward pass.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm; None disables clipping.")
    log_every: PositiveInt = Field(10, description="Steps between progress lines and metric updates.")
    prefetch: bool = Field(True, description="Read the next step's micro-batches in a background thread while this step computes.")
    compile: bool = Field(
        False, description="torch.compile each transformer block. The first steps pay the compile time; see "
        "docs/benchmarks.md for when it pays off.",
    )


class OptimSection(Section):
    lr: float = Field(3e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    implementation: Literal["auto", "foreach", "fused"] = Field(
        "auto", description="AdamW kernels: fused (one kernel for all parameters), foreach (a few kernels per step), "
        "or auto: fused on GPUs, foreach on CPUs (see docs/benchmarks.md). zero1 always uses foreach.",
    )

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}; the usual values are [0.9, 0.95]")
        return betas


class ScheduleSection(Section):
    name: str = Field("cosine", description=f"One of {', '.join(SCHEDULE_NAMES)}.")
    warmup_steps: NonNegativeInt = 20
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of optim.lr.")
    decay_ratio: float = Field(0.2, gt=0, le=1, description="wsd only: fraction of train.steps spent in the final decay.")
    decay_shape: Literal["cosine", "linear"] = Field("cosine", description="wsd only: shape of the final decay.")

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if name not in SCHEDULE_NAMES:
            raise ValueError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULE_NAMES)}")
        return name


Strategy = Literal["ddp", "zero1", "zero2", "zero3", "fsdp", "hsdp"]
FSDP_STRATEGIES = ("zero2", "zero3", "fsdp", "hsdp")


class ParallelSection(Section):
    strategy: Strategy = Field(
        "fsdp",
        description="ddp: replicated parameters, gradients and optimizer state; zero1: DDP with the optimizer state "
        "sharded; zero2: FSDP2 that keeps parameters unsharded from forward to backward; zero3 or fsdp: FSDP2 full "
        "shard; hsdp: FSDP2 sharded within groups of hsdp_shard_size ranks and replicated across groups. See docs/parallelism.md.",
    )
    param_dtype: DType = Field(
        "float32", description="Compute dtype of forward and backward. Parameters, gradients and optimizer state stay float32.",
    )
    reduce_dtype: DType = Field("float32", description="Dtype of the gradient reduce-scatter (FSDP strategies only).")
    init_loss_scale: float = Field(2.0**16, gt=0, description="float16 only: initial dynamic loss scale.")
    loss_scale_growth_interval: PositiveInt = Field(1000, description="float16 only: overflow-free steps before the scale doubles.")
    min_loss_scale: float = Field(1.0, gt=0, description="float16 only: the dynamic loss scale never drops below this.")
    hsdp_shard_size: PositiveInt | None = Field(
        None, description="hsdp only: ranks in each shard group, for example the GPUs of one node; must divide the world size.",
    )
    cpu_offload: bool = Field(
        False, description="FSDP strategies only: keep sharded parameters, gradients and optimizer state in host memory "
        "and run the optimizer step there.",
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="Recompute block activations in backward: none, full (every block), or selective "
        "(blocks 0, k, 2k, ... with k = checkpoint_every).",
    )
    checkpoint_every: PositiveInt = Field(2, description="selective activation checkpointing: recompute every k-th block.")
    tensor_parallel_size: PositiveInt = Field(
        1, description="Ranks that split each attention and MLP projection (with sequence parallelism); must divide the "
        "world size. 1 disables tensor parallelism. Works with fsdp, zero3 and zero2.",
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> "ParallelSection":
        strategy = self.strategy
        if strategy == "hsdp" and self.hsdp_shard_size is None:
            raise ValueError("parallel.strategy='hsdp' needs parallel.hsdp_shard_size (ranks per shard group); "
                             "set it to a divisor of scaling.num_workers, for example the GPUs per node")
        if strategy != "hsdp" and self.hsdp_shard_size is not None:
            raise ValueError(f"parallel.hsdp_shard_size={self.hsdp_shard_size} applies only to strategy 'hsdp', "
                             f"not {strategy!r}; remove it or set parallel.strategy=hsdp")
        if self.cpu_offload and strategy not in FSDP_STRATEGIES:
            raise ValueError(f"parallel.cpu_offload=true needs an FSDP strategy ({', '.join(FSDP_STRATEGIES)}), "
                             f"not {strategy!r}; change parallel.strategy or turn offload off")
        if self.reduce_dtype != "float32" and strategy not in FSDP_STRATEGIES:
            raise ValueError(f"parallel.reduce_dtype={self.reduce_dtype!r} needs an FSDP strategy: {strategy!r} "
                             "all-reduces float32 gradients; set parallel.reduce_dtype=float32")
        if self.tensor_parallel_size > 1 and strategy not in ("fsdp", "zero3", "zero2"):
            raise ValueError(f"parallel.tensor_parallel_size={self.tensor_parallel_size} works with strategies fsdp, "
                             f"zero3 and zero2, not {strategy!r}; change parallel.strategy or set tensor_parallel_size=1")
        return self


class ScalingSection(Section):
    num_workers: PositiveInt | tuple[PositiveInt, PositiveInt] = Field(
        2,
        description="Training workers (ranks): a number, or [min, max] for an elastic run that shrinks when "
        "nodes are lost and grows back when capacity returns.",
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    resize_check_interval_s: float = Field(
        60.0, gt=0, description="Elastic runs: seconds between checks for capacity to grow the worker group."
    )
    worker_group_start_timeout_s: float = Field(
        30.0, gt=0,
        description="Seconds Ray Train waits for a worker group to start before it retries, smaller if elastic. "
        "Ray's own default is 60; a lower value shrinks sooner when a node is really gone.",
    )
    health_check_interval_s: float = Field(
        1.0, gt=0,
        description="Seconds between the Ray Train controller's polls of the workers: a dead worker is noticed at the "
        "next poll. Ray's own default is 2. A lower value recovers sooner, and each poll is one remote call to every worker.",
    )

    @field_validator("num_workers")
    @classmethod
    def _check_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError(f"scaling.num_workers={list(value)} has min > max; write it as [min, max]")
        return value

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    @property
    def world_sizes(self) -> range:
        return range(self.min_workers, self.max_workers + 1)


class CheckpointSection(Section):
    every_steps: PositiveInt | None = Field(50, description="Save after every N optimizer steps; None: no step-based saves.")
    every_hours: float | None = Field(
        None, gt=0, description="Also save when this many hours passed since the last save (whichever of the two comes first); None: no time-based saves.",
    )
    keep_last: PositiveInt | Literal["all"] = Field(
        3, description="Committed checkpoints to keep, newest first, or 'all' to delete none. The newest is always kept.",
    )
    keep_every_steps: PositiveInt | None = Field(
        None, description="Keep every checkpoint whose step is a multiple of this as a permanent milestone; None: no milestones.",
    )
    save_final: bool = Field(True, description="Save after the last step.")
    async_save: bool = Field(
        True, description="Write checkpoints in the background while training continues; false blocks each save until it commits.",
    )
    overlap_policy: Literal["wait", "skip"] = Field(
        "wait", description="When a save is due while another is in flight: 'wait' blocks training until the running one ends, "
        "'skip' drops the new one. Final, SIGTERM and preemption saves always wait.",
    )
    max_inflight_steps: PositiveInt | None = Field(
        1, description="Steps a background save may overlap: after that many steps training waits for its commit, so a "
        "crash can lose at most that much more than the checkpoint interval. None: wait only when the next save is due "
        "or the run ends (the least stall when uploads take longer than a step).",
    )
    retry_initial_backoff_s: float = Field(5.0, gt=0, description="Seconds before the first retry after a failed save; doubles per failure.")
    retry_max_backoff_s: float = Field(300.0, gt=0, description="Longest wait between save retries, in seconds.")
    max_outage_s: float = Field(
        3600.0, gt=0, description="Seconds saves may keep failing (or one save may run) before the run stops with an error.",
    )
    upload_part_bytes: Annotated[int, Field(ge=5 * 2**20)] = Field(
        64 * 2**20, description="Part size of S3 multipart uploads, in bytes (at least 5 MiB, the S3 minimum).",
    )
    upload_concurrency: PositiveInt = Field(8, description="Parts of one file uploaded in parallel.")

    @field_validator("keep_last", mode="before")
    @classmethod
    def _keep_all_alias(cls, value: Any) -> Any:
        # null meant "keep all" before the named setting existed; existing configs keep working.
        return "all" if value is None else value


class MetricsSection(Section):
    enabled: bool = True
    host: str = Field("127.0.0.1", description="Address the Prometheus endpoint listens on.")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(9464, description="Port of the Prometheus endpoint; 0 picks a free one.")
    peak_flops_per_device: float | None = Field(
        None, gt=0,
        description="Peak FLOP/s of one device, the denominator of MFU (model FLOPs utilization). None looks the GPU "
        "up in the table of workers/flops.py; on CPU, or on a GPU not in the table, MFU is not reported.",
    )


class WandbSection(Section):
    enabled: bool = Field(False, description="Log metrics to Weights & Biases (needs the `tracking` extra: pip install 'stalwart[tracking]').")
    project: str = "stalwart"
    entity: str | None = Field(None, description="W&B team or user; None uses the default of the API key.")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline writes the run under dir only; upload it later with `wandb sync`.",
    )
    dir: str | None = Field(None, description="Local folder for W&B files; None: the folder the driver runs in.")


Policy = Literal["log", "skip", "rollback"]


class DetectorSection(Section):
    enabled: bool = True
    threshold: float = Field(
        gt=0,
        description="loss_zscore: robust z-score against the rolling median and MAD; grad_norm_ratio: multiple of the "
        "rolling median; loss_ratio: multiple of the rolling mean.",
    )
    policy: Policy = Field(description="log: record only; skip: skip the optimizer step; rollback: reload the last checkpoint before the spike and skip a window of batches.")


DETECTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "loss_zscore": {"enabled": True, "threshold": 6.0, "policy": "rollback"},
    "grad_norm_ratio": {"enabled": True, "threshold": 10.0, "policy": "skip"},
    "loss_ratio": {"enabled": False, "threshold": 2.0, "policy": "log"},
}


class StabilitySection(Section):
    window: PositiveInt = Field(50, description="Steps of rolling history each detector compares against; no decision before it is full.")
    nonfinite_policy: Literal["skip", "rollback"] = Field("skip", description="Action on a non-finite loss or grad norm.")
    loss_zscore: DetectorSection = Field(default_factory=lambda: DetectorSection(threshold=6.0, policy="rollback"))
    # Gradient norms are heavy-tailed even in healthy runs (3x the median is common), so
    # the grad-norm rule is a multiple of the median rather than a z-score.
    grad_norm_ratio: DetectorSection = Field(default_factory=lambda: DetectorSection(threshold=10.0, policy="skip"))
    loss_ratio: DetectorSection = Field(default_factory=lambda: DetectorSection(enabled=False, threshold=2.0, policy="log"))
    rollback_skip_batches: PositiveInt = Field(100, description="Global batches skipped after a rollback, starting at the first batch after the checkpoint (always through the spike's batch).")
    max_events: PositiveInt | None = Field(10, description="Abort the run when more events than this fall within event_window_steps; None never aborts.")
    event_window_steps: PositiveInt = 1000

    @field_validator("loss_zscore", "grad_norm_ratio", "loss_ratio", mode="before")
    @classmethod
    def _fill_detector_defaults(cls, value: Any, info: Any) -> Any:
        # A partial override such as --set stability.loss_zscore.policy=log keeps the other defaults.
        if isinstance(value, dict):
            return {**DETECTOR_DEFAULTS[info.field_name], **value}
        return value


class FaultToleranceSection(Section):
    hang_timeout_s: float | None = Field(
        None, gt=0,
        description="Abort the attempt when no step completes for this many seconds; None derives it from "
        "the observed step time (hang_timeout_step_multiple x the median, at least hang_timeout_floor_s).",
    )
    hang_timeout_floor_s: float = Field(300.0, gt=0, description="Smallest derived hang timeout, and the timeout before the first step.")
    hang_timeout_step_multiple: float = Field(20.0, gt=1)
    straggler_factor: float = Field(1.5, gt=1, description="A rank whose busy time per step exceeds this multiple of the median is a straggler.")
    straggler_intervals: PositiveInt = Field(3, description="Consecutive logging intervals a rank must be slow before it is flagged.")
    stop_grace_s: float = Field(
        120.0, gt=0,
        description="Seconds from SIGTERM to a forced exit. SIGTERM to the driver: it asks the workers to save and "
        "stop, and exits anyway after this long. SIGTERM to a worker: every rank saves after its next step and the "
        "attempt restarts. A worker still running this long after its SIGTERM exits.",
    )

    @property
    def collective_timeout_s(self) -> float:
        """Process-group timeout: never longer than the watchdog would wait."""
        return self.hang_timeout_s if self.hang_timeout_s is not None else self.hang_timeout_floor_s


class KillFault(Section):
    kind: Literal["kill"] = "kill"
    rank: NonNegativeInt
    step: PositiveInt


class HangFault(Section):
    """Block rank ``rank`` at ``step`` for ``seconds`` (the hang watchdog should act first)."""

    kind: Literal["hang"] = "hang"
    rank: NonNegativeInt
    step: PositiveInt
    seconds: float = Field(3600.0, gt=0)


class SlowFault(Section):
    """Delay rank ``rank`` by ``seconds`` on every step from ``step`` on (a straggler)."""

    kind: Literal["slow"] = "slow"
    rank: NonNegativeInt
    step: PositiveInt
    seconds: float = Field(0.5, gt=0)


class RemoveNodeFault(Section):
    """Remove the Ray node that hosts rank ``rank`` at ``step`` by killing its raylet with SIGKILL.

    The head node runs the GCS and cannot be removed, so there only the rank is killed.
    """

    kind: Literal["remove_node"] = "remove_node"
    rank: NonNegativeInt
    step: PositiveInt


class SpikeFault(Section):
    """Multiply the loss (and so the gradients) of every rank by ``factor`` at ``step``."""

    kind: Literal["spike"] = "spike"
    step: PositiveInt
    factor: float = Field(20.0, gt=0)


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    wandb: WandbSection = Field(default_factory=WandbSection)
    stability: StabilitySection = Field(default_factory=StabilitySection)
    fault_tolerance: FaultToleranceSection = Field(default_factory=FaultToleranceSection)
    faults: list[Annotated[KillFault | HangFault | SlowFault | RemoveNodeFault | SpikeFault,
                           Field(discriminator="kind")]] = Field(
        default_factory=list, description="Faults to inject, each fired once per run."
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> "Config":
        world_size = self.scaling.max_workers
        if not self.scaling.elastic:
            # Ranks of one tensor-parallel group train on the same samples.
            tp_size = self.parallel.tensor_parallel_size
            data_ranks = "scaling.num_workers" if tp_size == 1 else "scaling.num_workers / parallel.tensor_parallel_size"
            per_step = self.train.micro_batch * (world_size // tp_size)
            if self.train.global_batch % per_step:
                raise ValueError(
                    f"train.global_batch={self.train.global_batch} is not divisible by "
                    f"train.micro_batch x {data_ranks} = {self.train.micro_batch} x {world_size // tp_size} = {per_step}; "
                    f"set train.global_batch to a multiple of {per_step} or change train.micro_batch"
                )
        else:
            # The global batch stays constant at every world size, so each size in the range must split it.
            unsplittable = [size for size in self.scaling.world_sizes if self.train.global_batch % (self.train.micro_batch * size)]
            if unsplittable:
                fitting = [size for size in self.scaling.world_sizes if size not in unsplittable]
                raise ValueError(
                    f"train.global_batch={self.train.global_batch} cannot be split into micro-batches of "
                    f"train.micro_batch={self.train.micro_batch} at world sizes {unsplittable} of scaling.num_workers="
                    f"{list(self.scaling.num_workers)}; restrict the range to sizes that divide it ({fitting or 'none'}), "
                    f"or choose train.global_batch as a multiple of micro_batch x every size (for example "
                    f"{self.train.micro_batch * _lcm(*self.scaling.world_sizes)})"
                )
        hang_timeout_s = self.fault_tolerance.collective_timeout_s
        if self.data.read_retry_s is not None and self.data.read_retry_s >= hang_timeout_s:
            setting = "hang_timeout_s" if self.fault_tolerance.hang_timeout_s is not None else "hang_timeout_floor_s"
            raise ValueError(
                f"data.read_retry_s={self.data.read_retry_s:g} is not below fault_tolerance.{setting}={hang_timeout_s:g}, "
                "so the hang watchdog would end a step that waits for storage before its retries do; lower "
                f"data.read_retry_s or raise fault_tolerance.{setting}"
            )
        if self.schedule.warmup_steps > self.train.steps:
            raise ValueError(
                f"schedule.warmup_steps={self.schedule.warmup_steps} exceeds train.steps={self.train.steps}; "
                "lower schedule.warmup_steps"
            )
        for fault in self.faults:
            if isinstance(fault, (KillFault, HangFault, SlowFault, RemoveNodeFault)) and fault.rank >= world_size:
                raise ValueError(
                    f"faults: rank={fault.rank} does not exist with scaling.num_workers={world_size}; "
                    f"use a rank below {world_size}"
                )
        if self.parallel.param_dtype == "float16" and self.parallel.reduce_dtype == "float16":
            raise ValueError(
                "parallel.reduce_dtype='float16' with param_dtype='float16' sums gradients over ranks in float16, "
                "which overflows; set parallel.reduce_dtype to 'float32'"
            )
        return self

    @model_validator(mode="after")
    def _check_parallel_layout(self) -> "Config":
        parallel = self.parallel
        for name, size in (("hsdp_shard_size", parallel.hsdp_shard_size), ("tensor_parallel_size", parallel.tensor_parallel_size)):
            unfit = [world for world in self.scaling.world_sizes if size is not None and world % size]
            if unfit:
                raise ValueError(f"parallel.{name}={size} does not divide the world size {unfit[0]} of scaling.num_workers; "
                                 "choose a divisor of every world size the run may have")
        tp_size = parallel.tensor_parallel_size
        if tp_size > 1:
            model = self.model
            ffn_hidden = model.ffn_hidden or 64 * math.ceil(int(8 * model.dim / 3) / 64)
            sizes = {"model.n_heads": model.n_heads, "model.n_kv_heads": model.n_kv_heads or model.n_heads,
                     "the SwiGLU hidden width": ffn_hidden, "model.vocab_size": model.vocab_size,
                     "model.seq_len": model.seq_len}
            for name, value in sizes.items():
                if value % tp_size:
                    raise ValueError(f"{name}={value} is not divisible by parallel.tensor_parallel_size={tp_size}; "
                                     "tensor parallelism splits it evenly across ranks, so choose sizes that divide")
            if model.tie_embeddings:
                raise ValueError("model.tie_embeddings=true is not supported with parallel.tensor_parallel_size > 1; "
                                 "untie the embeddings or set tensor_parallel_size=1")
        return self

    @property
    def data_read_retry_s(self) -> float:
        """Return the retry budget of the dataset reads and history writes in training, in seconds.

        That is ``data.read_retry_s`` when set, otherwise half the hang timeout.
        """
        if self.data.read_retry_s is not None:
            return self.data.read_retry_s
        return self.fault_tolerance.collective_timeout_s / 2

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per rank per optimizer step at the largest world size."""
        return self.grad_accum_steps_at(self.scaling.max_workers)

    def grad_accum_steps_at(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step at ``world_size`` (the global batch is constant)."""
        return self.train.global_batch // (self.train.micro_batch * (world_size // self.parallel.tensor_parallel_size))


def _lcm(*numbers: int) -> int:
    return math.lcm(*numbers)


def _format_location(location: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in location:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "<root>"


def _fix_hint(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "remove it or check its spelling against `stalwart config --defaults`"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return "give a value of the type shown in `stalwart config --defaults`"
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        return "choose a value inside the allowed range"
    if kind == "literal_error":
        return "use one of the values listed"
    if kind in {"union_tag_not_found", "union_tag_invalid"}:
        return "give each fault a kind: kill, hang, slow or remove_node (with rank and step), or spike (with step and factor)"
    if kind == "string_pattern_mismatch":
        return "use letters, digits, '.', '_' and '-' only, starting with a letter or digit"
    return "see the message for the allowed values"


def format_validation_error(error: ValidationError) -> str:
    """Render pydantic errors as one line per field: field, value, problem, fix."""
    lines = ["invalid configuration:"]
    for item in error.errors():
        field = _format_location(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "value_error":
            # Our own validators already name the field, the value and the fix.
            lines.append(f"  {message}" if not item["loc"] else f"  {field}: {message}")
            continue
        value = item.get("input")
        lines.append(f"  {field}: {message} (got {value!r}); {_fix_hint(item)}")
    return "\n".join(lines)


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads floats without a dot, such as 3e-4, as YAML 1.2 does."""


# PyYAML follows YAML 1.1, where a float needs a dot, so it reads 3e-4 as the string "3e-4".
_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SafeLoader)


def _parse_override_value(text: str) -> Any:
    # YAML scalars give the expected types: 3e-4 -> float, true -> bool, null -> None, [1, 2] -> list.
    try:
        return _load_yaml(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw config tree in place."""
    key, sep, raw_value = override.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise ConfigError(f"invalid override {override!r}; write it as section.field=value, for example optim.lr=3e-4")
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"invalid override {override!r}: {part} is not a section; check the key against `stalwart config --defaults`")
        node = child
    node[parts[-1]] = _parse_override_value(raw_value)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a config from an optional YAML file plus ``key=value`` overrides, validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror}; check the path") from error
        try:
            loaded = _load_yaml(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must contain a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    for override in overrides:
        apply_override(tree, override)
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Validate a raw config tree; raise ``ConfigError`` naming every invalid field."""
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


# "token" only as a whole word part (auth_token, session_token), so data.tokenizer stays visible.
# "username" is s3fs's other name for the access key id ("key").
SECRET_KEY_PATTERN = re.compile(r"secret|password|(^|_)token($|_)|credential|key$|key_id$|^key|username",
                                re.IGNORECASE)
# The user:password part of a URL such as http://user:password@proxy:3128.
URL_USERINFO_PATTERN = re.compile(r"(?<=://)[^/@\s]+@")


def redact_url_credentials(text: str) -> str:
    """Replace the user and password of every URL in ``text``."""
    return URL_USERINFO_PATTERN.sub("<redacted>@", text)


def redact_secrets(value: Any) -> Any:
    """Return a copy of a config tree with credential-like values replaced, for logs and saved configs."""
    if isinstance(value, dict):
        return {
            key: "<redacted>" if SECRET_KEY_PATTERN.search(str(key)) and item not in (None, "") else redact_secrets(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact_secrets(item) for item in value]
    if isinstance(value, str):
        return redact_url_credentials(value)
    return value
