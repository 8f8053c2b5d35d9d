"""Config validation: unknown keys, types, cross-field rules, overrides, YAML files, redaction."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.config import ConfigError, apply_override, config_from_dict, load_config, redact_secrets

REPO_ROOT = Path(__file__).resolve().parent.parent


def config_error(tree: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(tree)
    return str(caught.value)


def test_defaults_validate():
    config = config_from_dict({})

    assert config.train.global_batch % (config.train.micro_batch * config.scaling.num_workers) == 0
    assert config.faults == []


def test_unknown_top_level_key_rejected():
    message = config_error({"trian": {"steps": 5}})

    assert "trian" in message
    assert "{'steps': 5}" in message
    assert "check its spelling" in message


def test_unknown_nested_key_rejected():
    message = config_error({"optim": {"learning_rate": 0.5}})

    assert "optim.learning_rate" in message
    assert "0.5" in message
    assert "check its spelling" in message


def test_wrong_type_rejected():
    message = config_error({"train": {"steps": "abc"}})

    assert "train.steps" in message
    assert "'abc'" in message
    assert "valid integer" in message
    assert "give a value of the type" in message


def test_out_of_range_value_rejected():
    message = config_error({"train": {"steps": 0}})

    assert "train.steps" in message
    assert "(got 0)" in message
    assert "allowed range" in message


def test_every_invalid_field_listed():
    message = config_error({"train": {"steps": "abc"}, "model": {"dim": -1}})

    assert "train.steps" in message
    assert "model.dim" in message


def test_global_batch_not_divisible_rejected():
    message = config_error({"train": {"global_batch": 10, "micro_batch": 2}, "scaling": {"num_workers": 3}})

    assert "train.global_batch=10" in message
    assert "train.micro_batch" in message
    assert "scaling.num_workers" in message
    assert "2 x 3 = 6" in message
    assert "multiple of 6" in message


def test_grad_accum_steps_from_batch_sizes():
    config = config_from_dict({"train": {"global_batch": 24, "micro_batch": 2}, "scaling": {"num_workers": 3}})

    assert config.grad_accum_steps == 4


def test_heads_not_dividing_dim_rejected():
    message = config_error({"model": {"dim": 96, "n_heads": 5}})

    assert "model.dim=96" in message
    assert "model.n_heads=5" in message


def test_warmup_longer_than_run_rejected():
    message = config_error({"train": {"steps": 10}, "schedule": {"warmup_steps": 11}})

    assert "schedule.warmup_steps=11" in message
    assert "train.steps=10" in message


def test_unknown_schedule_rejected():
    message = config_error({"schedule": {"name": "linear"}})

    assert "schedule.name" in message
    assert "'linear'" in message
    assert "cosine" in message


def test_override_parses_exponent_float():
    tree: dict = {}
    apply_override(tree, "optim.lr=3e-4")

    # YAML 1.1 (PyYAML) reads 3e-4 as a string; the override must still give a float.
    assert tree == {"optim": {"lr": 3e-4}}
    assert isinstance(tree["optim"]["lr"], float)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=0.001", 0.001),
        ("optim.lr=-2.5E+3", -2500.0),
        ("train.steps=12", 12),
        ("train.grad_clip=null", None),
        ("metrics.enabled=false", False),
        ("run.name=tiny-1", "tiny-1"),
        ("optim.betas=[0.8, 0.99]", [0.8, 0.99]),
    ],
)
def test_override_value_types(override: str, expected):
    tree: dict = {}
    apply_override(tree, override)

    section, field = override.split("=", 1)[0].split(".")
    assert tree[section][field] == expected
    assert type(tree[section][field]) is type(expected)


def test_override_replaces_yaml_value(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.01\n  weight_decay: 0.2\n", encoding="utf-8")

    config = load_config(path, ["optim.lr=3e-4"])

    assert config.optim.lr == 3e-4
    assert config.optim.weight_decay == 0.2


def test_override_faults_list():
    config = load_config(None, ["faults=[{kind: kill, rank: 1, step: 5}, {kind: kill, rank: 0, step: 9}]"])

    assert [(fault.kind, fault.rank, fault.step) for fault in config.faults] == [("kill", 1, 5), ("kill", 0, 9)]


def test_fault_on_missing_rank_rejected():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["scaling.num_workers=2", "faults=[{kind: kill, rank: 2, step: 3}]"])

    message = str(caught.value)
    assert "rank=2" in message
    assert "scaling.num_workers=2" in message
    assert "rank below 2" in message


def test_fault_unknown_kind_rejected():
    message = config_error({"faults": [{"kind": "explode", "rank": 0, "step": 1}]})

    assert "faults[0]" in message
    assert "'explode'" in message
    assert "kill, hang, slow or remove_node" in message


def test_remove_node_fault_parsed():
    config = load_config(None, ["faults=[{kind: remove_node, rank: 1, step: 12}]"])

    assert [(fault.kind, fault.rank, fault.step) for fault in config.faults] == [("remove_node", 1, 12)]


def test_remove_node_fault_on_missing_rank_rejected():
    message = config_error({"scaling": {"num_workers": [1, 2]}, "faults": [{"kind": "remove_node", "rank": 2, "step": 3}]})

    assert "rank=2" in message
    assert "rank below 2" in message


def test_remove_node_fault_without_step_rejected():
    message = config_error({"faults": [{"kind": "remove_node", "rank": 1}]})

    assert "faults[0].remove_node.step" in message
    assert "Field required" in message


@pytest.mark.parametrize("override", ["optim.lr", "=3", "optim..lr=1", "1optim.lr=1", "optim.lr 3"])
def test_invalid_override_syntax_rejected(override: str):
    with pytest.raises(ConfigError) as caught:
        apply_override({}, override)

    message = str(caught.value)
    assert repr(override) in message
    assert "section.field=value" in message


def test_override_below_scalar_rejected():
    tree = {"run": {"name": "demo"}}

    with pytest.raises(ConfigError) as caught:
        apply_override(tree, "run.name.first=x")

    assert "name is not a section" in str(caught.value)


def test_override_unknown_field_rejected():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["optim.momentum=0.9"])

    assert "optim.momentum" in str(caught.value)


def test_yaml_list_file_rejected(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- run\n- train\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert str(path) in message
    assert "must contain a mapping" in message
    assert "got list" in message


def test_invalid_yaml_file_rejected(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: {steps: 5\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert "is not valid YAML" in str(caught.value)


def test_missing_config_file_rejected(tmp_path: Path):
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert str(path) in message
    assert "check the path" in message


def test_empty_yaml_file_gives_defaults(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n", encoding="utf-8")

    assert load_config(path) == config_from_dict({})


def test_tiny_example_loads():
    config = load_config(REPO_ROOT / "examples" / "tiny.yaml")

    assert config.run.name == "tiny-demo"
    assert config.data.paths is None
    assert config.scaling.num_workers == 2
    assert config.optim.lr == 3e-3
    assert config.optim.betas == (0.9, 0.95)
    assert config.grad_accum_steps == 2


def test_config_round_trips_through_json():
    config = load_config(None, ["optim.lr=3e-4", "faults=[{kind: kill, rank: 1, step: 5}]"])

    assert config_from_dict(config.model_dump(mode="json")) == config


def test_redact_hides_credentials():
    options = {
        "key": "AKIAEXAMPLE",
        "secret": "wJalrXUtnFEMI",
        "token": "session-token",
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {
            "region_name": "us-east-1",
            "aws_access_key_id": "AKIAEXAMPLE",
            "aws_secret_access_key": "wJalrXUtnFEMI",
            "aws_session_token": "session-token",
        },
    }

    redacted = redact_secrets({"storage": {"uri": "s3://bucket/runs", "options": options}})

    storage = redacted["storage"]
    assert storage["uri"] == "s3://bucket/runs"
    assert storage["options"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert storage["options"]["client_kwargs"]["region_name"] == "us-east-1"
    for name in ("key", "secret", "token"):
        assert storage["options"][name] == "<redacted>", name
    for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        assert storage["options"]["client_kwargs"][name] == "<redacted>", name


def test_redact_hides_url_credentials():
    options = {
        "username": "AKIAEXAMPLE",
        "password": "wJalrXUtnFEMI",
        "endpoint_url": "https://minio:wJalrXUtnFEMI@storage.example:9000/",
        "config_kwargs": {"proxies": {"https": "http://proxyuser:proxypass@proxy.example:3128"}},
    }

    redacted = redact_secrets({"storage": {"options": options}})["storage"]["options"]

    assert redacted["username"] == "<redacted>"
    assert redacted["password"] == "<redacted>"
    assert redacted["endpoint_url"] == "https://<redacted>@storage.example:9000/"
    assert redacted["config_kwargs"]["proxies"]["https"] == "http://<redacted>@proxy.example:3128"


def test_redact_leaves_input_unchanged():
    tree = {"storage": {"options": {"secret": "wJalrXUtnFEMI"}}}

    redact_secrets(tree)

    assert tree["storage"]["options"]["secret"] == "wJalrXUtnFEMI"


def test_redact_keeps_unset_credentials_visible():
    # An empty or null credential is no secret, and showing it helps debug a missing setting.
    redacted = redact_secrets({"key": None, "secret": ""})

    assert redacted == {"key": None, "secret": ""}


def test_trainer_exports_controller_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from service.driver import build_trainer  # noqa: PLC0415 (imports ray)

    # setenv first, so monkeypatch restores the variables after the test even though they start unset.
    for name in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    tree = {"storage": {"uri": str(tmp_path)}, "scaling": {"health_check_interval_s": 0.25, "worker_group_start_timeout_s": 12}}
    build_trainer(config_from_dict(tree), str(tmp_path / "run"), str(tmp_path / "data"), None)
    # Ray Train propagates both variables to its controller actor.
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.25"
    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "12.0"

    # A later run in the same process gets its own values.
    tree["scaling"]["health_check_interval_s"] = 0.5
    build_trainer(config_from_dict(tree), str(tmp_path / "run"), str(tmp_path / "data"), None)
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"

    # A value the user exported wins over the config.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    build_trainer(config_from_dict(tree), str(tmp_path / "run"), str(tmp_path / "data"), None)
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"


def test_read_retry_defaults_from_hang_timeout():
    assert load_config(None, []).data_read_retry_s == 150  # half of hang_timeout_floor_s
    assert load_config(None, ["fault_tolerance.hang_timeout_s=10"]).data_read_retry_s == 5
    assert load_config(None, ["data.read_retry_s=30"]).data_read_retry_s == 30


def test_read_retry_past_hang_timeout_rejected():
    with pytest.raises(ConfigError, match=r"data.read_retry_s=20 is not below fault_tolerance.hang_timeout_s=10.*"
                                          r"lower data.read_retry_s or raise fault_tolerance.hang_timeout_s"):
        load_config(None, ["fault_tolerance.hang_timeout_s=10", "data.read_retry_s=20"])
