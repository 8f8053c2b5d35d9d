"""The bench scripts: the bare FSDP2 loop trains exactly like `stalwart train`, and the helpers count right.

The equivalence test runs bench/bare_fsdp.py on 2 ranks under
torch.distributed.run and `stalwart train` on an embedded Ray cluster, both on
127.0.0.1, through the same command builders bench/overhead.py uses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench import gpu_check, overhead  # noqa: E402
from bench.bare_fsdp import steady_tokens_per_second  # noqa: E402
from workers.flops import training_flops_per_token  # noqa: E402
from workers.model import ModelArgs, Transformer, count_parameters  # noqa: E402

CONFIG = str(REPO_ROOT / "examples" / "tiny.yaml")
STEPS = 5
TINY_OVERRIDES = [
    "model.n_layers=2", "model.dim=64", "model.seq_len=64", "train.global_batch=8", "train.micro_batch=2",
    "data.max_files=20", f"train.steps={STEPS}", "schedule.warmup_steps=2",
]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_bare_loop_matches_stalwart_bitwise(tmp_path):
    """Same model init, data order, FSDP wrapping, thread count and gloo reductions: equal floats, not close ones."""
    overrides = [*TINY_OVERRIDES, f"storage.uri={tmp_path}"]
    run_name = "bench-equivalence"
    stalwart_overrides = [*overrides, f"run.name={run_name}", "checkpoint.every_steps=null",
                          "checkpoint.save_final=false", "metrics.port=0"]

    bare = overhead.run_bare(CONFIG, overrides, num_workers=2, warmup_steps=1, timeout_s=240)
    stalwart = overhead.run_stalwart("stalwart", CONFIG, stalwart_overrides, f"{tmp_path}/{run_name}",
                                     warmup_steps=1, timeout_s=240)

    expected_steps = list(range(1, STEPS + 1))
    assert [record["step"] for record in bare.records] == expected_steps
    assert [record["step"] for record in stalwart.records] == expected_steps
    assert [record["loss"] for record in bare.records] == [record["loss"] for record in stalwart.records]
    assert [record["grad_norm"] for record in bare.records] == [record["grad_norm"] for record in stalwart.records]
    assert [record["lr"] for record in bare.records] == [record["lr"] for record in stalwart.records]
    assert [record["tokens"] for record in bare.records] == [record["tokens"] for record in stalwart.records]
    # Guards against comparing two runs that never updated the weights.
    assert bare.records[-1]["loss"] < bare.records[0]["loss"]


def test_steady_tokens_per_second_hand_count():
    records = [{"time": 10.0, "tokens": 100}, {"time": 11.0, "tokens": 100},
               {"time": 13.0, "tokens": 100}, {"time": 14.0, "tokens": 100}]

    # Window after step 1: 300 tokens from t=10 to t=14.
    assert steady_tokens_per_second(records, 1) == 75.0
    # Window after step 2: 200 tokens from t=11 to t=14.
    assert steady_tokens_per_second(records, 2) == pytest.approx(200 / 3)


def test_steady_tokens_per_second_too_few_steps():
    records = [{"time": 10.0, "tokens": 100}, {"time": 11.0, "tokens": 100}]

    assert steady_tokens_per_second(records, 1) is None
    assert steady_tokens_per_second(records, 0) is None


def test_saves_in_window_hand_count():
    # Saves after steps 5, 10 and 15 delay steps 6, 11 and 16; the save after step 20 comes after the last record.
    assert overhead.saves_in_window(steps=20, warmup_steps=5, every=5) == 3
    # A save after step 4 delays step 5, which is inside the warmup.
    assert overhead.saves_in_window(steps=20, warmup_steps=5, every=4) == 3


def test_median_step_ignores_one_slow_step():
    # Steps 2..5 take 1, 1, 5 and 1 s after the warmup step 1; the median gap is 1 s.
    records = [{"time": time_s, "tokens": 100} for time_s in (0.0, 1.0, 2.0, 7.0, 8.0)]

    assert overhead.median_step_tokens_per_second(records, 1) == 100.0


def step_records(times_s: list[float]) -> list[dict]:
    return [{"step": index + 1, "time": time_s, "tokens": 100} for index, time_s in enumerate(times_s)]


def test_report_figures_hand_count(capsys):
    results = {
        "bare": [overhead.RunResult("bare", "bare", step_records([0, 1, 2, 3, 4, 5]), 2, 10.0)],
        "stalwart": [overhead.RunResult("stalwart", "plain", step_records([0, 1, 2.1, 3.2, 4.3, 5.4]), 2, 20.0)],
        "checkpointed": overhead.RunResult("stalwart+checkpoints", "saving", step_records([0, 1, 2.5, 3.6, 5.0, 6.1]),
                                           2, 30.0, [0.3]),
        "host_extras_us": {"faults": 1.0, "stability": 2.0, "reporting": 3.0},
    }
    args = argparse.Namespace(steps=6, warmup_steps=2, repeats=1, checkpoint_every=2)

    overhead.print_report(args, results)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]

    # After step 2 (t=1): bare 400 tokens in 4.0 s, Stalwart in 4.4 s, with checkpoints in 5.1 s.
    assert summary["bare_median"] == pytest.approx(100.0)
    assert summary["stalwart_median"] == pytest.approx(400 / 4.4)
    assert summary["ratio"] == pytest.approx(4.0 / 4.4)
    assert summary["checkpoint_ratio"] == pytest.approx(4.4 / 5.1)
    # Saves after steps 2 and 4 fall inside the window: (5.1 - 4.4) / 2 s each.
    assert summary["saves_in_window"] == 2
    assert summary["extra_s_per_save"] == pytest.approx(0.35)


def test_parse_bare_output_keeps_step_records_only():
    output = "\n".join([
        "*****", "Setting OMP_NUM_THREADS environment variable for each process to be 1",
        json.dumps({"step": 2, "loss": 4.0, "time": 2.0, "tokens": 8}),
        json.dumps({"step": 1, "loss": 5.0, "time": 1.0, "tokens": 8}),
        json.dumps({"summary": True, "steps": 2, "steady_tokens_per_second": None}),
    ])

    records = overhead.parse_bare_output(output)

    assert [record["step"] for record in records] == [1, 2]


def test_gpu_check_without_gpu_exits_with_message():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}

    completed = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--steps", "3",
                                "--warmup-steps", "1"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                               timeout=120)

    assert completed.returncode == 2
    assert "no CUDA GPU is visible" in completed.stderr
    assert "--device cpu" in completed.stderr


def test_gpu_check_cpu_smoke_reports_mfu():
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--device", "cpu",
                                "--model", "tiny", "--steps", "3", "--warmup-steps", "1", "--peak-tflops", "1"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout.strip().splitlines()[-1])["summary"]
    tiny = ModelArgs(**gpu_check.MODEL_PRESETS["tiny"])

    assert summary["tokens_per_step"] == 4 * tiny.seq_len
    assert summary["training_flops_per_token"] == training_flops_per_token(tiny)
    assert summary["peak_flops"] == 1e12
    assert summary["mfu"] == pytest.approx(summary["tokens_per_second"] * summary["training_flops_per_token"] / 1e12)
    assert summary["max_memory_allocated_gib"] is None


def test_gpu_check_1b_preset_is_about_1b():
    args = ModelArgs(**gpu_check.MODEL_PRESETS["1b"])
    with torch.device("meta"):
        model = Transformer(args)

    assert 1.0e9 <= count_parameters(model) <= 1.2e9
