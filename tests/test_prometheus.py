"""Metrics, dashboard and alert rules against a real Prometheus scraping a real training run.

One short run on an embedded Ray cluster injects a loss spike (rolled back) and a
killed rank (a restart), so restarts, rollbacks and checkpoints all have data.
Prometheus (Debian's package) scrapes the run's metrics actor every second from
before the first step until after the last, with deploy/prometheus/alerts.yaml
loaded. The same run logs to W&B in offline mode.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import json
import math
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml
from prometheus_client.parser import text_string_to_metric_families

from prometheus_server import (
    DASHBOARD_PATH,
    PROMETHEUS_DIR,
    PrometheusServer,
    dashboard_expressions,
    require_binary,
    run_promtool,
    substitute_variables,
)
from service.config import config_from_dict
from service.driver import run_training, start_metrics, start_ray

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

RUN = "observed"
STEPS = 30
SPIKE_STEP = 17  # rolled back to the checkpoint of step 15
KILL_STEP = 24  # rank 1 dies; the restart resumes from step 20
PEAK_FLOPS = 1e11  # a made-up CPU peak, so MFU has a value to export
# Query windows that cover the whole run when the queries run right after it.
RANGE_S = 900
RATE_INTERVAL_S = 600
ALLOWED_LABELS = {"run", "rank", "cause", "detector", "action", "part", "le"}
EXPECTED_FAMILIES = {
    "stalwart_step", "stalwart_loss", "stalwart_learning_rate", "stalwart_grad_norm", "stalwart_tokens_per_second",
    "stalwart_tokens", "stalwart_skipped_steps", "stalwart_restarts", "stalwart_checkpoint_save_seconds",
    "stalwart_checkpoint_stall_seconds", "stalwart_checkpoint_size_bytes", "stalwart_checkpoint_written_bytes",
    "stalwart_last_committed_step", "stalwart_last_checkpoint_timestamp_seconds", "stalwart_start_time_seconds",
    "stalwart_world_size", "stalwart_stability_events", "stalwart_hangs", "stalwart_rank_busy_seconds",
    "stalwart_straggler", "stalwart_goodput_ratio", "stalwart_wall_seconds", "stalwart_mfu_ratio",
    "stalwart_checkpoint_load_seconds", "stalwart_checkpoint_loaded_bytes",
}


def run_config(storage: str, wandb_dir: str) -> dict:
    return {
        "run": {"name": RUN, "seed": 3, "max_failures": 2},
        "storage": {"uri": storage},
        "model": {"n_layers": 2, "dim": 64, "n_heads": 4, "seq_len": 64},
        "data": {"max_files": 40},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "log_every": 5},
        "schedule": {"warmup_steps": 5},
        "checkpoint": {"every_steps": 5},
        "stability": {"window": 10, "rollback_skip_batches": 3},
        "metrics": {"port": 0, "peak_flops_per_device": PEAK_FLOPS},
        "wandb": {"enabled": True, "mode": "offline", "project": "stalwart-test", "dir": wandb_dir},
        "scaling": {"num_workers": 2},
        "faults": [{"kind": "spike", "step": SPIKE_STEP, "factor": 30.0}, {"kind": "kill", "rank": 1, "step": KILL_STEP}],
    }


@pytest.fixture(scope="module")
def observed_run(tmp_path_factory):
    require_binary("prometheus")
    pytest.importorskip("wandb", reason="wandb is in the test extra: pip install -e '.[test]'")
    folder = tmp_path_factory.mktemp("observed")
    # W&B runs inside the metrics actor, which inherits the environment of the embedded cluster.
    with pytest.MonkeyPatch.context() as patch:
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            patch.setenv(name, str(folder / name.lower()))
        patch.delenv("WANDB_API_KEY", raising=False)
        assert start_ray(None), "a Ray instance was already running in this test process"
    prometheus = None
    try:
        config = config_from_dict(run_config(str(folder / "storage"), str(folder / "wandb-files")))
        actor = start_metrics(config)
        host, port = ray.get(actor.address.remote())
        prometheus = PrometheusServer(folder / "prometheus", [f"{host}:{port}"])
        prometheus.start()
        prometheus.wait_for(f'stalwart_step{{run="{RUN}"}}')

        started = time.time()
        summary = run_training(config, metrics_actor=actor)
        # A few more scrapes, so the final values are in Prometheus too.
        prometheus.wait_for(f'stalwart_step{{run="{RUN}"}} == {STEPS}')
        time.sleep(3)
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            scrape = response.read().decode("utf-8")
        yield {"prometheus": prometheus, "scrape": scrape, "summary": summary, "started": started,
               "ended": time.time(), "folder": folder}
    finally:
        if prometheus is not None:
            prometheus.stop()
        ray.shutdown()


def families(scrape: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(scrape)}


def sample_value(scrape: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return sample.value
    raise KeyError(f"no sample {name}{labels} in the scrape")


def finite_values(result: list[dict]) -> list[float]:
    values = []
    for series in result:
        points = [series["value"]] if "value" in series else series.get("values", [])
        values += [float(value) for _, value in points if math.isfinite(float(value))]
    return values


# The scrape itself.


def test_scrape_passes_promtool_check_metrics(observed_run):
    result = run_promtool("check", "metrics", stdin=observed_run["scrape"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", f"promtool lint findings:\n{result.stdout}"


def test_scrape_has_every_family(observed_run):
    missing = EXPECTED_FAMILIES - set(families(observed_run["scrape"]))
    assert not missing, f"families missing from the scrape: {sorted(missing)}"


def test_labels_are_bounded(observed_run):
    unexpected = {
        (sample.name, key)
        for family in families(observed_run["scrape"]).values() if family.name.startswith("stalwart_")
        for sample in family.samples for key in sample.labels if key not in ALLOWED_LABELS
    }
    assert not unexpected, f"labels outside {sorted(ALLOWED_LABELS)}: {sorted(unexpected)}"


def test_restart_and_rollback_counted(observed_run):
    scrape = observed_run["scrape"]
    assert sample_value(scrape, "stalwart_restarts_total", run=RUN, cause="failure") == 1
    assert sample_value(scrape, "stalwart_restarts_total", run=RUN, cause="hang") == 0
    assert sample_value(scrape, "stalwart_stability_events_total", run=RUN, action="rollback", detector="loss_zscore") == 1
    assert sample_value(scrape, "stalwart_last_committed_step", run=RUN) == STEPS
    # One load for the rollback to step 15, one for the restart's resume from step 20.
    assert sample_value(scrape, "stalwart_checkpoint_load_seconds_count", run=RUN) == 2
    assert sample_value(scrape, "stalwart_checkpoint_loaded_bytes_total", run=RUN) > 0
    assert observed_run["summary"].restarts == 1


def test_mfu_exported_and_summarized(observed_run):
    mfu_ratio = sample_value(observed_run["scrape"], "stalwart_mfu_ratio", run=RUN)
    assert 0 < mfu_ratio < 1
    summary = observed_run["summary"]
    assert summary.mfu is not None and 0 < summary.mfu < 1
    assert any(line.strip().startswith("MFU ") and "%" in line for line in summary.lines())


# The dashboard.


def test_dashboard_is_portable():
    dashboard = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    assert "__inputs" not in dashboard
    assert dashboard["id"] is None
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    references = []

    def collect(node):
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                references.append(node["datasource"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(dashboard)
    foreign = [ref for ref in references if ref.get("uid") not in ("${datasource}", "-- Grafana --")]
    assert not foreign, f"datasource references other than the template variable: {foreign}"
    assert {annotation["name"] for annotation in dashboard["annotations"]["list"]} >= {"Restarts", "Rollbacks", "Checkpoints"}


def test_every_panel_returns_data(observed_run):
    prometheus = observed_run["prometheus"]
    dashboard = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    expressions = dashboard_expressions(dashboard)
    assert len(expressions) >= 20
    empty = []
    for title, expr in expressions:
        query = substitute_variables(expr, RUN, RANGE_S, RATE_INTERVAL_S)
        result = prometheus.query(query)
        assert result["status"] == "success", f"panel {title!r}: {query}: {result.get('error')}"
        if not finite_values(result["data"]["result"]):
            empty.append(f"{title}: {query}")
    assert not empty, "panels without a finite value:\n" + "\n".join(empty)


def test_run_variable_lists_the_run(observed_run):
    dashboard = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    variable = next(item for item in dashboard["templating"]["list"] if item["name"] == "run")
    # label_values(METRIC, LABEL) is Grafana's call of the label values API.
    metric, label = variable["query"]["query"].removeprefix("label_values(").removesuffix(")").split(", ")
    result = observed_run["prometheus"].api(f"/api/v1/label/{label}/values", **{"match[]": metric})
    assert RUN in result["data"]


@pytest.mark.parametrize("name", ["Restarts", "Rollbacks", "Checkpoints"])
def test_annotation_marks_event(observed_run, name):
    dashboard = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    annotation = next(item for item in dashboard["annotations"]["list"] if item["name"] == name)
    query = substitute_variables(annotation["expr"], RUN, RANGE_S, RATE_INTERVAL_S)
    result = observed_run["prometheus"].query_range(query, observed_run["started"], observed_run["ended"], 1)
    assert result["status"] == "success", f"{query}: {result.get('error')}"
    assert finite_values(result["data"]["result"]), f"annotation {name!r} marks nothing during the run: {query}"


# The alert rules.


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yaml").read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_loaded_and_healthy(observed_run):
    groups = observed_run["prometheus"].api("/api/v1/rules")["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == {rule["alert"] for rule in alert_rules()}
    unhealthy = {name: rule.get("lastError") for name, rule in loaded.items() if rule["health"] != "ok"}
    assert not unhealthy, f"rules that failed to evaluate: {unhealthy}"


def test_alert_expressions_evaluate(observed_run):
    for rule in alert_rules():
        result = observed_run["prometheus"].query(rule["expr"])
        assert result["status"] == "success", f"{rule['alert']}: {result.get('error')}"


def test_no_alert_fires_on_healthy_short_run(observed_run):
    alerts = observed_run["prometheus"].api("/api/v1/alerts")["data"]["alerts"]
    assert alerts == [], f"alerts active after a short run: {alerts}"


# promtool on the files alone.


def test_promtool_check_rules():
    result = run_promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    result = run_promtool("test", "rules", str(PROMETHEUS_DIR / "alerts.test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config():
    result = run_promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


# W&B, offline.


def test_wandb_offline_run_has_history(observed_run):
    from wandb_records import history_rows, summary_values

    files = sorted(Path(observed_run["folder"], "wandb-files").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run, found {files}"
    rows = [row for row in history_rows(files[0]) if "train/loss" in row]
    steps = [row["train/step"] for row in rows]
    assert steps[-1] == STEPS
    assert all(0 < row["train/mfu"] < 1 for row in rows)
    summary = summary_values(files[0])
    assert summary["restarts"] == 1
    assert 0 < summary["goodput/ratio"] < 1
