"""DeepSpeed config import: examples/ds_config.json onto Stalwart's config, and every key it cannot honour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import main as cli_main
from service.config import ConfigError, load_config
from service.deepspeed_import import import_deepspeed, import_deepspeed_file
from workers.schedule import lr_multiplier

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "ds_config.json"
BASE_WORLD_SIZE = 2


@pytest.fixture(scope="module")
def example():
    return import_deepspeed_file(EXAMPLE, BASE_WORLD_SIZE)


@pytest.fixture(scope="module")
def example_config(example):
    return load_config(None, example.override_strings())


def test_example_maps_onto_config(example_config):
    config = example_config
    assert config.parallel.strategy == "zero3"
    assert config.parallel.cpu_offload is True
    assert config.parallel.param_dtype == "float16"
    assert config.parallel.reduce_dtype == "float32"
    assert config.parallel.init_loss_scale == 2.0**16
    assert config.parallel.loss_scale_growth_interval == 1000
    assert config.parallel.min_loss_scale == 1.0
    assert config.parallel.activation_checkpointing == "full"
    assert config.train.global_batch == 64
    assert config.train.micro_batch == 4
    assert config.scaling.num_workers == 8
    assert config.grad_accum_steps == 2
    assert config.train.grad_clip == 1.0
    assert config.train.log_every == 10
    assert config.train.steps == 1000
    assert config.optim.lr == 3e-4
    assert config.optim.betas == (0.9, 0.95)
    assert config.optim.eps == 1e-8
    assert config.optim.weight_decay == 0.1
    assert config.schedule.warmup_steps == 100


def test_warmup_decay_lr_matches_deepspeed_formula(example_config):
    # DeepSpeed's WarmupDecayLR (linear warmup): lr = max_lr * step / warmup while warming up,
    # then max_lr * (total - step) / (total - warmup).
    schedule, total = example_config.schedule, example_config.train.steps
    for step in (1, 50, 100, 101, 550, 999, 1000):
        expected = step / 100 if step <= 100 else (total - step) / (total - 100)
        actual = lr_multiplier(schedule.name, step, warmup_steps=schedule.warmup_steps, total_steps=total,
                               min_ratio=schedule.min_lr_ratio, decay_ratio=schedule.decay_ratio,
                               decay_shape=schedule.decay_shape)
        assert actual == pytest.approx(expected, abs=1e-12), f"step {step}"


def test_example_lists_unhonoured_keys(example):
    unhonoured = {item.deepspeed_key for item in example.unhonoured}
    assert unhonoured == {
        "fp16.hysteresis",
        "zero_optimization.offload_param.device",
        "zero_optimization.offload_param.nvme_path",
        "zero_optimization.offload_param.buffer_count",
        "zero_optimization.overlap_comm",
        "zero_optimization.contiguous_gradients",
        "zero_optimization.reduce_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size",
        "zero_optimization.stage3_param_persistence_threshold",
        "zero_optimization.stage3_max_live_parameters",
        "zero_optimization.stage3_max_reuse_distance",
        "zero_optimization.stage3_gather_16bit_weights_on_model_save",
    }


def test_nvme_offload_reason_names_nvme(example):
    reasons = {item.deepspeed_key: item.reason for item in example.unhonoured}
    assert "NVMe" in reasons["zero_optimization.offload_param.device"]


def test_every_example_key_is_accounted_for(example):
    """Each leaf of the example is mapped, listed as not honoured, or a flag that is off."""
    tree = json.loads(EXAMPLE.read_text())
    accounted = {item.deepspeed_key for item in example.mapped} | {item.deepspeed_key for item in example.unhonoured}

    def leaves(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and key not in ("activation_checkpointing",):
                yield from leaves(value, f"{path}.")
            else:
                yield path, value

    # Values Stalwart already has (dynamic loss scale, linear warmup from 0, AdamW), or switches that are off.
    honoured_silently = {"wall_clock_breakdown", "fp16.loss_scale", "scheduler.params.warmup_min_lr",
                 "scheduler.params.warmup_type", "zero_optimization.offload_optimizer.pin_memory",
                 "zero_optimization.offload_param.pin_memory", "optimizer.type"}
    missing = [path for path, _ in leaves(tree) if path not in accounted and path not in honoured_silently]
    assert missing == []


@pytest.mark.parametrize("stage, strategy", [(0, "ddp"), (1, "zero1"), (2, "zero2"), (3, "zero3")])
def test_zero_stage_selects_strategy(stage, strategy):
    result = import_deepspeed({"zero_optimization": {"stage": stage}}, BASE_WORLD_SIZE)
    assert result.overrides["parallel.strategy"] == strategy


def test_cpu_offload_below_stage_2_not_honoured():
    result = import_deepspeed({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}, BASE_WORLD_SIZE)
    assert "parallel.cpu_offload" not in result.overrides
    assert [item.deepspeed_key for item in result.unhonoured] == ["zero_optimization.offload_optimizer.device"]


def test_log_warmup_and_static_loss_scale_not_honoured():
    tree = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_max_lr": 0.001}},
            "fp16": {"enabled": True, "loss_scale": 128}}
    result = import_deepspeed(tree, BASE_WORLD_SIZE)
    assert result.overrides["schedule.name"] == "constant"
    keys = {item.deepspeed_key for item in result.unhonoured}
    # DeepSpeed's warmup_type defaults to "log"; hysteresis defaults to 2.
    assert keys == {"scheduler.params.warmup_type", "fp16.loss_scale", "fp16.hysteresis"}


def test_auto_values_and_unknown_keys_listed():
    result = import_deepspeed({"train_batch_size": "auto", "flops_profiler": {"enabled": True}}, BASE_WORLD_SIZE)
    reasons = {item.deepspeed_key: item.reason for item in result.unhonoured}
    assert "Hugging Face" in reasons["train_batch_size"]
    assert reasons["flops_profiler"] == "no Stalwart equivalent"


def test_micro_batch_and_accumulation_use_base_world_size():
    result = import_deepspeed({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 4)
    assert result.overrides["train.global_batch"] == 2 * 3 * 4


def test_inconsistent_batch_sizes_rejected():
    with pytest.raises(ConfigError, match="not divisible"):
        import_deepspeed({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4,
                          "gradient_accumulation_steps": 2}, BASE_WORLD_SIZE)


def test_bad_json_rejected(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        import_deepspeed_file(path, BASE_WORLD_SIZE)


def test_cli_config_prints_mapping_and_result(capsys):
    status = cli_main(["config", "--from-deepspeed", str(EXAMPLE), "--set", "train.steps=50",
                       "--set", "schedule.warmup_steps=5"])
    captured = capsys.readouterr()
    assert status == 0
    assert "zero_optimization.stage = 3 -> parallel.strategy = \"zero3\"" in captured.err
    assert "zero_optimization.offload_param.device = \"nvme\": NVMe offload is not supported" in captured.err
    # --set wins over the DeepSpeed file.
    assert "steps: 50" in captured.out
    assert "strategy: zero3" in captured.out
