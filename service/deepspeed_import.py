"""Map a DeepSpeed JSON config onto Stalwart's config, naming every key that cannot be honoured.

``stalwart train --from-deepspeed ds_config.json`` applies the mapped values
on top of the YAML config (``-c``) and below the ``--set`` overrides, and
prints the mapping first. The mapping follows the DeepSpeed config reference
(https://www.deepspeed.ai/docs/config-json/):

- ``zero_optimization.stage`` 0, 1, 2, 3 selects ``ddp``, ``zero1``, ``zero2``, ``zero3``;
- CPU offload of the optimizer or the parameters turns on ``parallel.cpu_offload``,
  which in FSDP2 offloads parameters, gradients and optimizer state together;
- ``fp16`` (dynamic loss scaling) and ``bf16`` set the compute dtype and the loss scaler;
- ``optimizer`` (Adam or AdamW) sets ``optim``, and ``WarmupLR``, ``WarmupDecayLR``
  and ``WarmupCosineLR`` set ``schedule`` and ``train.steps``;
- the three batch sizes set ``train.global_batch``, ``train.micro_batch`` and, when
  all three are given, the world size;
- an ``activation_checkpointing`` section turns on full activation checkpointing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.config import ConfigError

ZERO_STAGES = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}
# zero_optimization keys that tune DeepSpeed's own buckets, prefetching and partitioning.
# FSDP2 groups communication per unit (one per block), so none of them has an equivalent.
ZERO_TUNING_KEYS = {
    "allgather_partitions", "allgather_bucket_size", "overlap_comm", "reduce_scatter", "reduce_bucket_size",
    "contiguous_gradients", "sub_group_size", "round_robin_gradients", "elastic_checkpoint",
    "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients", "mics_shard_size",
    "memory_efficient_linear", "ignore_unused_parameters", "load_from_fp32_weights", "cpu_offload",
}
# Activation checkpointing keys with no effect to honour when they are off.
ACTIVATION_FLAGS = ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization",
                    "synchronize_checkpoint_boundary", "profile")
DEFAULT_INITIAL_SCALE_POWER = 16  # DeepSpeed's fp16 defaults
DEFAULT_LOSS_SCALE_WINDOW = 1000
DEFAULT_HYSTERESIS = 2
DEFAULT_MIN_LOSS_SCALE = 1


@dataclass(frozen=True)
class MappedKey:
    deepspeed_key: str
    deepspeed_value: Any
    stalwart_key: str
    stalwart_value: Any
    note: str = ""


@dataclass(frozen=True)
class UnhonouredKey:
    deepspeed_key: str
    deepspeed_value: Any
    reason: str


@dataclass
class DeepSpeedImport:
    """The result of mapping one DeepSpeed config: Stalwart overrides, what each came from, and what was left out."""

    overrides: dict[str, Any] = field(default_factory=dict)  # dotted Stalwart key -> value
    mapped: list[MappedKey] = field(default_factory=list)
    unhonoured: list[UnhonouredKey] = field(default_factory=list)

    def set(self, deepspeed_key: str, deepspeed_value: Any, stalwart_key: str, value: Any, note: str = "") -> None:
        self.overrides[stalwart_key] = value
        self.mapped.append(MappedKey(deepspeed_key, deepspeed_value, stalwart_key, value, note))

    def reject(self, deepspeed_key: str, deepspeed_value: Any, reason: str) -> None:
        self.unhonoured.append(UnhonouredKey(deepspeed_key, deepspeed_value, reason))

    def override_strings(self) -> list[str]:
        """Return the overrides as ``key=value`` strings for ``load_config`` (JSON values parse as YAML)."""
        return [f"{key}={json.dumps(value)}" for key, value in self.overrides.items()]

    def report_lines(self) -> list[str]:
        lines = ["DeepSpeed config mapped onto Stalwart:"]
        for item in self.mapped:
            note = f"  ({item.note})" if item.note else ""
            lines.append(f"  {item.deepspeed_key} = {json.dumps(item.deepspeed_value)} -> "
                         f"{item.stalwart_key} = {json.dumps(item.stalwart_value)}{note}")
        if self.unhonoured:
            lines.append(f"not honoured ({len(self.unhonoured)} keys):")
            for item in self.unhonoured:
                lines.append(f"  {item.deepspeed_key} = {json.dumps(item.deepspeed_value)}: {item.reason}")
        else:
            lines.append("every key was honoured")
        return lines


def load_deepspeed_file(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config; raise ``ConfigError`` naming the file on a read or parse error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read DeepSpeed config {str(path)!r}: {error.strerror}; check the path") from error
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(tree, dict):
        raise ConfigError(f"DeepSpeed config {str(path)!r} must be a JSON object, got {type(tree).__name__}")
    return tree


def import_deepspeed(tree: dict[str, Any], world_size: int) -> DeepSpeedImport:
    """Map a DeepSpeed config tree onto Stalwart overrides; ``world_size`` is the base config's, used for batch sizes."""
    result = DeepSpeedImport()
    handlers = {
        "train_batch_size": None, "train_micro_batch_size_per_gpu": None, "gradient_accumulation_steps": None,
        "gradient_clipping": _map_gradient_clipping, "steps_per_print": _map_steps_per_print,
        "optimizer": _map_optimizer, "scheduler": _map_scheduler, "fp16": _map_fp16, "bf16": _map_bf16,
        "zero_optimization": _map_zero, "activation_checkpointing": _map_activation_checkpointing,
        "wall_clock_breakdown": _map_off_flag, "zero_allow_untested_optimizer": _map_off_flag,
    }
    _map_batch_sizes(tree, world_size, result)
    for key, value in tree.items():
        if value == "auto":
            result.reject(key, value, "'auto' is filled in by the Hugging Face Trainer integration; give a number")
            continue
        if key not in handlers:
            result.reject(key, value, "no Stalwart equivalent")
            continue
        handler = handlers[key]
        if handler is not None:
            handler(key, value, result)
    return result


def import_deepspeed_file(path: str | Path, world_size: int) -> DeepSpeedImport:
    return import_deepspeed(load_deepspeed_file(path), world_size)


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"DeepSpeed config: {key}={value!r} must be a positive integer")
    return value


def _map_batch_sizes(tree: dict[str, Any], world_size: int, result: DeepSpeedImport) -> None:
    """Map the three batch sizes, related by train_batch_size = micro x accumulation x world size."""
    names = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    given = {name: tree[name] for name in names if name in tree and tree[name] != "auto"}
    values = {name: _positive_int(name, value) for name, value in given.items()}
    total = values.get("train_batch_size")
    micro = values.get("train_micro_batch_size_per_gpu")
    accumulation = values.get("gradient_accumulation_steps")
    if micro is not None:
        result.set("train_micro_batch_size_per_gpu", micro, "train.micro_batch", micro)
    if total is not None:
        result.set("train_batch_size", total, "train.global_batch", total)
    if total is not None and micro is not None and accumulation is not None:
        if total % (micro * accumulation):
            raise ConfigError(
                f"DeepSpeed config: train_batch_size={total} is not divisible by train_micro_batch_size_per_gpu x "
                f"gradient_accumulation_steps = {micro} x {accumulation}; fix the batch sizes")
        ranks = total // (micro * accumulation)
        result.set("gradient_accumulation_steps", accumulation, "scaling.num_workers", ranks,
                   "world size = train_batch_size / (micro batch x accumulation); Stalwart derives the accumulation")
    elif micro is not None and accumulation is not None:
        result.set("gradient_accumulation_steps", accumulation, "train.global_batch", micro * accumulation * world_size,
                   f"micro batch x accumulation x {world_size} workers (scaling.num_workers of the base config)")
    elif accumulation is not None:
        result.reject("gradient_accumulation_steps", accumulation,
                      "Stalwart derives the accumulation from train.global_batch, train.micro_batch and the world "
                      "size; give train_micro_batch_size_per_gpu too")


def _map_gradient_clipping(key: str, value: Any, result: DeepSpeedImport) -> None:
    # DeepSpeed treats 0 as "no clipping".
    result.set(key, value, "train.grad_clip", None if not value else float(value))


def _map_steps_per_print(key: str, value: Any, result: DeepSpeedImport) -> None:
    result.set(key, value, "train.log_every", _positive_int(key, value))


def _map_off_flag(key: str, value: Any, result: DeepSpeedImport) -> None:
    if value:
        result.reject(key, value, "no Stalwart equivalent")


def _reject_extra_keys(key: str, value: dict[str, Any], result: DeepSpeedImport) -> None:
    for name, setting in value.items():
        if name not in ("type", "params"):
            result.reject(f"{key}.{name}", setting, "not read by DeepSpeed here: its settings go under params")


def _map_optimizer(key: str, value: Any, result: DeepSpeedImport) -> None:
    _reject_extra_keys(key, value, result)
    kind = str(value.get("type", "")).lower()
    params = dict(value.get("params", {}))
    if kind not in ("adam", "adamw"):
        result.reject(f"{key}.type", value.get("type"), "Stalwart trains with AdamW only")
        return
    # DeepSpeed's Adam applies decoupled weight decay (AdamW) unless params.adam_w_mode is false
    # (true by default, microsoft/DeepSpeed pull request 844).
    adam_w_mode = params.pop("adam_w_mode", True)
    if kind == "adam" and not adam_w_mode and params.get("weight_decay"):
        result.reject(f"{key}.params.adam_w_mode", adam_w_mode,
                      "Adam with L2 weight decay in the gradient is not AdamW; Stalwart decouples weight decay")
    for name, target in (("lr", "optim.lr"), ("eps", "optim.eps"), ("weight_decay", "optim.weight_decay")):
        if name in params:
            result.set(f"{key}.params.{name}", params.pop(name), target, float(value["params"][name]))
    if "betas" in params:
        betas = params.pop("betas")
        result.set(f"{key}.params.betas", betas, "optim.betas", [float(beta) for beta in betas])
    for name, setting in params.items():
        if name == "torch_adam":
            continue  # the choice of kernel, not of the update
        result.reject(f"{key}.params.{name}", setting, "not an AdamW setting Stalwart has")


def _map_scheduler(key: str, value: Any, result: DeepSpeedImport) -> None:
    _reject_extra_keys(key, value, result)
    kind = value.get("type")
    params = dict(value.get("params", {}))
    if kind not in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR"):
        result.reject(f"{key}.type", kind, "Stalwart has warmup with constant, cosine or warmup-stable-decay LR only")
        return
    warmup_type = params.pop("warmup_type", "log")
    if warmup_type != "linear" and kind != "WarmupCosineLR":
        result.reject(f"{key}.params.warmup_type", warmup_type, "Stalwart's warmup is linear")
    warmup_min = params.pop("warmup_min_lr", 0.0)
    if warmup_min:
        result.reject(f"{key}.params.warmup_min_lr", warmup_min, "Stalwart's warmup starts from zero")
    warmup_steps = int(params.pop("warmup_num_steps", 1000))
    result.set(f"{key}.params.warmup_num_steps", warmup_steps, "schedule.warmup_steps", warmup_steps)
    if "warmup_max_lr" in params:
        peak = params.pop("warmup_max_lr")
        result.set(f"{key}.params.warmup_max_lr", peak, "optim.lr", float(peak), "the scheduler's peak LR wins")

    if kind == "WarmupLR":
        result.set(f"{key}.type", kind, "schedule.name", "constant")
    elif kind == "WarmupDecayLR":
        total = _positive_int(f"{key}.params.total_num_steps", params.pop("total_num_steps", None))
        result.set(f"{key}.params.total_num_steps", total, "train.steps", total)
        # Linear decay from the end of warmup to zero at the last step: WSD with no stable phase.
        result.set(f"{key}.type", kind, "schedule.name", "wsd", "linear decay to 0 after warmup")
        result.overrides.update({"schedule.decay_shape": "linear", "schedule.min_lr_ratio": 0.0,
                                 "schedule.decay_ratio": (total - warmup_steps) / total})
    else:
        total = _positive_int(f"{key}.params.total_num_steps", params.pop("total_num_steps", None))
        result.set(f"{key}.params.total_num_steps", total, "train.steps", total)
        result.set(f"{key}.type", kind, "schedule.name", "cosine")
        ratio = params.pop("cos_min_ratio", 0.0001)
        result.set(f"{key}.params.cos_min_ratio", ratio, "schedule.min_lr_ratio", float(ratio))
        start = params.pop("warmup_min_ratio", 0.0)
        if start:
            result.reject(f"{key}.params.warmup_min_ratio", start, "Stalwart's warmup starts from zero")
    for name, setting in params.items():
        result.reject(f"{key}.params.{name}", setting, f"not a {kind} setting Stalwart has")


def _map_fp16(key: str, value: Any, result: DeepSpeedImport) -> None:
    if not value.get("enabled", False):
        return
    result.set(f"{key}.enabled", True, "parallel.param_dtype", "float16")
    result.overrides["parallel.reduce_dtype"] = "float32"
    settings = {name: setting for name, setting in value.items() if name != "enabled"}
    static_scale = settings.pop("loss_scale", 0)
    if static_scale:
        result.reject(f"{key}.loss_scale", static_scale, "Stalwart scales the loss dynamically; a static scale is not kept")
    power = settings.pop("initial_scale_power", DEFAULT_INITIAL_SCALE_POWER)
    result.set(f"{key}.initial_scale_power", power, "parallel.init_loss_scale", float(2**power))
    window = settings.pop("loss_scale_window", DEFAULT_LOSS_SCALE_WINDOW)
    result.set(f"{key}.loss_scale_window", window, "parallel.loss_scale_growth_interval", int(window))
    minimum = settings.pop("min_loss_scale", DEFAULT_MIN_LOSS_SCALE)
    result.set(f"{key}.min_loss_scale", minimum, "parallel.min_loss_scale", float(minimum))
    hysteresis = settings.pop("hysteresis", DEFAULT_HYSTERESIS)
    if hysteresis != 1:
        result.reject(f"{key}.hysteresis", hysteresis,
                      "Stalwart lowers the loss scale at the first overflow (hysteresis 1)")
    for name, setting in settings.items():
        result.reject(f"{key}.{name}", setting, "no Stalwart equivalent")


def _map_bf16(key: str, value: Any, result: DeepSpeedImport) -> None:
    if value.get("enabled", False):
        result.set(f"{key}.enabled", True, "parallel.param_dtype", "bfloat16")
    for name, setting in value.items():
        if name != "enabled":
            result.reject(f"{key}.{name}", setting, "no Stalwart equivalent")


def _map_zero(key: str, value: Any, result: DeepSpeedImport) -> None:
    settings = dict(value)
    stage = settings.pop("stage", 0)
    if stage not in ZERO_STAGES:
        raise ConfigError(f"DeepSpeed config: zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    strategy = ZERO_STAGES[stage]
    result.set(f"{key}.stage", stage, "parallel.strategy", strategy)

    offloaded = []
    for part in ("offload_optimizer", "offload_param"):
        offload = settings.pop(part, None)
        if not offload:
            continue
        device = offload.get("device", "none")
        if device == "cpu":
            offloaded.append(part)
        elif device == "nvme":
            result.reject(f"{key}.{part}.device", device, "NVMe offload is not supported; FSDP2 offloads to CPU memory only")
        for name, setting in offload.items():
            if name not in ("device", "pin_memory"):
                result.reject(f"{key}.{part}.{name}", setting, "tunes DeepSpeed's offload engine; no FSDP2 equivalent")
    if offloaded and strategy in ("zero2", "zero3"):
        note = "FSDP2 offloads parameters, gradients and optimizer state together"
        result.set(f"{key}.{offloaded[0]}.device", "cpu", "parallel.cpu_offload", True, note)
    elif offloaded:
        result.reject(f"{key}.{offloaded[0]}.device", "cpu", f"CPU offload needs ZeRO stage 2 or 3 in Stalwart, not {stage}")

    for name, setting in settings.items():
        if name in ("stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save"):
            result.reject(f"{key}.{name}", setting, "Stalwart saves sharded float32 checkpoints with "
                          "torch.distributed.checkpoint, never a gathered 16-bit copy")
        elif name in ZERO_TUNING_KEYS:
            result.reject(f"{key}.{name}", setting, "tunes DeepSpeed's buckets or partitioning; FSDP2 has no such setting")
        else:
            result.reject(f"{key}.{name}", setting, "no Stalwart equivalent")


def _map_activation_checkpointing(key: str, value: Any, result: DeepSpeedImport) -> None:
    # In DeepSpeed the model code decides which layers checkpoint; Stalwart recomputes every block.
    result.set(key, "{...}", "parallel.activation_checkpointing", "full", "every transformer block is recomputed")
    for name, setting in value.items():
        if name in ACTIVATION_FLAGS and not setting:
            continue
        if name == "number_checkpoints" and setting is None:
            continue
        reasons = {
            "partition_activations": "splitting saved activations across model-parallel ranks is not supported",
            "cpu_checkpointing": "saved activations stay on the device",
            "number_checkpoints": "every block is a checkpoint",
        }
        result.reject(f"{key}.{name}", setting, reasons.get(name, "no Stalwart equivalent"))
