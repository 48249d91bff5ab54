"""deploy/: the Grafana dashboard, the Dockerfile and the example sbatch scripts are consistent with the code."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "ecpt-dashboard.json"
# Series the workers and the checkpoint library serve (histograms also as _bucket/_sum/_count).
KNOWN_METRICS = {
    "ecpt_step",
    "ecpt_loss",
    "ecpt_lr",
    "ecpt_tokens_total",
    "ecpt_tokens_per_second",
    "ecpt_step_seconds",
    "ecpt_phase",
    "ecpt_world_size",
    "ecpt_eval_loss",
    "ecpt_recovery_seconds",
    "ecpt_steps_lost_total",
    "ecpt_restarts_total",
    "ecpt_membership_changes_total",
    "ecpt_goodput_ratio",
    "ecpt_checkpoint_blocked_seconds",
    "ecpt_checkpoint_durable_seconds",
    "ecpt_checkpoint_bytes_total",
    "ecpt_checkpoint_failures_total",
    "ecpt_checkpoint_skipped_total",
}
METRIC_RE = re.compile(r"\becpt_[a-z_]+")


def dashboard_panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def base_name(series: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", series)


def test_dashboard_is_valid_json_and_every_expr_names_a_served_ecpt_metric():
    exprs = [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    assert len(exprs) >= 15
    for expr in exprs:
        names = {base_name(n) for n in METRIC_RE.findall(expr)}
        assert names, f"expression names no ecpt_ metric: {expr}"
        assert names <= KNOWN_METRICS, f"unknown metric(s) {names - KNOWN_METRICS} in {expr}"


@pytest.mark.parametrize(
    "topic,metric",
    [
        ("loss", "ecpt_loss"),
        ("learning rate", "ecpt_lr"),
        ("tokens per second", "ecpt_tokens_per_second"),
        ("world size", "ecpt_world_size"),
        ("restarts", "ecpt_restarts_total"),
        ("recovery", "ecpt_recovery_seconds"),
        ("checkpoint stall", "ecpt_checkpoint_blocked_seconds"),
        ("checkpoint durable", "ecpt_checkpoint_durable_seconds"),
        ("goodput", "ecpt_goodput_ratio"),
    ],
)
def test_dashboard_has_a_panel_per_topic(topic, metric):
    panels = [p for p in dashboard_panels() if topic in p["title"].lower()]
    assert panels, f"no panel titled with {topic!r}"
    assert any(metric in t["expr"] for p in panels for t in p["targets"]), f"{topic} panels do not plot {metric}"


def test_dashboard_panels_have_unique_ids_and_a_prometheus_datasource():
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in doc["templating"]["list"]} >= {"datasource", "job"}
    assert all(p["datasource"]["type"] == "prometheus" for p in dashboard_panels())


def test_dockerfile_copies_paths_that_exist_and_pins_the_cpu_torch_wheel():
    text = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    sources = [w for line in text.splitlines() if line.startswith("COPY") for w in line.split()[1:-1]]
    assert sources and all((REPO / s).exists() for s in sources), sources
    assert "https://download.pytorch.org/whl/cpu" in text and "torch==${TORCH_VERSION}" in text
    assert "GPU variant" in text


@pytest.mark.parametrize("name", ["ecpt-cpu.sbatch", "ecpt-gpu.sbatch"])
def test_example_sbatch_scripts_are_valid_bash_with_the_preemption_contract(name):
    text = (REPO / "deploy" / "slurm" / name).read_text()
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    for needle in (
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@",
        'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1',
        "-m launch.agent",
        "-m elastic.worker",
        "trap forward_usr1 USR1",
    ):
        assert needle in text, needle
    assert ("#SBATCH --gpus-per-node" in text) == ("gpu" in name)
