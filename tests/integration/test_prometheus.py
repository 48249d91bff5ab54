"""deploy/prometheus against a real Prometheus: promtool checks and rule unit tests, and a live server scraping a
running 2-worker `ecpt train` through the file_sd target files the ranks write."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from support.configs import write_toml
from support.packages import INSTALL_BUDGET
from support.processes import REPO, start_ecpt_train
from support.prometheus import QUERY_POLL, READY_TIMEOUT
from support.waiting import wait_for

PROM_DIR = REPO / "deploy" / "prometheus"
SHIPPED_TARGET_GLOB = "/srv/ecpt/runs/tiny-cpu/prometheus/*.json"
PROMTOOL_TIMEOUT, MARGIN = 60, 60
# The first test to need promtool may install Prometheus (INSTALL_BUDGET); then at most three promtool runs.
pytestmark = pytest.mark.timeout(INSTALL_BUDGET + 3 * PROMTOOL_TIMEOUT + MARGIN)


def promtool_run(promtool: str, *args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=PROMTOOL_TIMEOUT)


def test_scrape_config_and_alert_rules_pass_promtool(promtool):
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        proc = promtool_run(promtool, *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 7 rules found" in promtool_run(promtool, "check", "rules", "alerts.yml").stdout


def test_kubernetes_scrape_config_passes_promtool(promtool, tmp_path):
    """Debian builds Prometheus without Kubernetes discovery; then the rest of the job is still checked, with
    file_sd standing in for kubernetes_sd (relabelling, annotations, the rule file)."""
    text = (PROM_DIR / "prometheus-k8s.yml").read_text()
    proc = promtool_run(promtool, "check", "config", "prometheus-k8s.yml")
    if proc.returncode != 0 and "kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        stand_in = text.replace(
            "kubernetes_sd_configs:\n      - role: pod", "file_sd_configs:\n      - files: [pods.json]"
        )
        assert stand_in != text
        (tmp_path / "prometheus-k8s.yml").write_text(stand_in)
        (tmp_path / "alerts.yml").write_text((PROM_DIR / "alerts.yml").read_text())
        proc = promtool_run(promtool, "check", "config", "prometheus-k8s.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_fires_and_resolves_in_promtool_unit_tests(promtool):
    proc = promtool_run(promtool, "test", "rules", "alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    alerts = set(re.findall(r"alert: (\w+)", (PROM_DIR / "alerts.yml").read_text()))
    tests = (PROM_DIR / "alerts_test.yml").read_text()
    for alert in alerts:
        checks = re.findall(rf"alertname: {alert}\n\s+exp_alerts:(.*)", tests)
        assert any(c.strip() == "[]" for c in checks) and any(c.strip() == "" for c in checks), (
            f"{alert}: needs a test where it fires and one where it is quiet/resolved"
        )


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    """Grafana's variables replaced by values, every panel expression must parse as PromQL."""
    doc = json.loads((REPO / "deploy" / "grafana" / "ecpt-dashboard.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] if p["type"] != "row" for t in p["targets"]]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e.replace("$__rate_interval", "1m").replace("$job", ".*")}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "dashboard_rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    proc = promtool_run(promtool, "check", "rules", str(tmp_path / "dashboard_rules.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def scrape_config_for(run_dir: Path, out: Path) -> Path:
    """The shipped prometheus.yml, pointed at this run's target files, scraping every second."""
    text = (PROM_DIR / "prometheus.yml").read_text()
    for needle in (SHIPPED_TARGET_GLOB, "scrape_interval: 15s", "- alerts.yml", "refresh_interval: 30s"):
        assert needle in text, f"deploy/prometheus/prometheus.yml changed: {needle!r} not found"
    text = (
        text.replace(SHIPPED_TARGET_GLOB, str(run_dir / "prometheus" / "*.json"))
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        .replace("refresh_interval: 30s", "refresh_interval: 1s")
        .replace("- alerts.yml", f"- {PROM_DIR / 'alerts.yml'}")
    )
    out.write_text(text)
    return out


@pytest.mark.slow
# installing Prometheus, the server ready, the waits below, the run stopping, the server stopping
@pytest.mark.timeout(INSTALL_BUDGET + READY_TIMEOUT + 90 + 6 * 30 + 30 + 60 + 15 + MARGIN)
def test_prometheus_scrapes_both_ranks_of_a_running_training_job(prometheus_server, tiny_raw, tmp_path):
    run_dir = tmp_path / "run"
    tiny_raw["train"]["run_dir"] = str(run_dir)
    for phase in tiny_raw["data"]["phases"]:
        phase["tokens"] *= 1000  # thousands of steps: it outlives the scrapes and is stopped once they are in
    config = write_toml(tiny_raw, tmp_path / "tiny.toml")
    server = prometheus_server(scrape_config_for(run_dir, tmp_path / "prometheus.yml"))
    started = time.monotonic()
    log = tmp_path / "train.log"
    train = start_ecpt_train(config, log=log)
    try:

        def both_ranks(promql: str):
            # worker series carry a rank label; the launcher's job-level series (role="launcher") do not
            result = [r for r in server.query(promql) if "rank" in r["metric"]]
            return result if {r["metric"]["rank"] for r in result} == {"0", "1"} else None

        def stepped():
            assert train.poll() is None, f"ecpt train ended early ({train.returncode}):\n{log.read_text()[-3000:]}"
            return both_ranks('ecpt_step{job="ecpt"} > 0')

        steps = wait_for(stepped, 90, "ecpt_step from ranks 0 and 1 in Prometheus", interval=QUERY_POLL)
        for promql in (
            'ecpt_loss{job="ecpt"}',
            'ecpt_world_size{job="ecpt"} == 2',
            'ecpt_lr{job="ecpt"}',
            'rate(ecpt_tokens_total{job="ecpt"}[5s]) > 0',
            'ecpt_step_seconds_count{job="ecpt"} > 0',
            'up{job="ecpt"} == 1',
        ):
            wait_for(lambda: both_ranks(promql), 30, f"{promql} for both ranks", interval=QUERY_POLL)
        wait_for(
            lambda: server.query('ecpt_restarts_total{job="ecpt",role="launcher"} == 0'),
            30,
            "the launcher's job-level series",
            interval=QUERY_POLL,
        )
        targets = [t for t in server.targets() if t["labels"]["job"] == "ecpt"]
        workers = [t for t in targets if "rank" in t["labels"]]
        launchers = [t for t in targets if t["labels"].get("role") == "launcher"]
        assert {t["labels"]["rank"] for t in workers} == {"0", "1"} and len(launchers) == 1
        assert all(t["health"] == "up" for t in targets)
        assert "exported_rank" not in steps[0]["metric"], "honor_labels keeps the worker's own rank label"
        names = {r["metric"]["__name__"] for r in server.query('{job="ecpt", __name__=~"ecpt_.+"}')}
        assert len(names) >= 8, names
        print(f"series of both ranks in Prometheus after {time.monotonic() - started:.1f} s: {sorted(names)}")
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGTERM)  # ecpt forwards it; workers stop at a step boundary
        train.wait(timeout=60)
