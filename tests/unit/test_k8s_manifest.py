"""`ecpt launch k8s` renders a Kubeflow PyTorchJob that parses and carries what an elastic job needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.k8s import to_yaml
from test_launch_render import launch

yaml = pytest.importorskip("yaml", reason="PyYAML parses the rendered manifests (pip install pyyaml)")
REPO = Path(__file__).resolve().parents[2]


def render(capsys, config: Path, *extra: str) -> list[dict]:
    code, out, err = launch(
        [
            "k8s",
            "--config",
            str(config),
            "--image",
            "registry.example/ecpt:cpu",
            "--min-nodes",
            "2",
            "--max-nodes",
            "4",
            *extra,
        ],
        capsys,
    )
    assert code == 0, err
    return list(yaml.safe_load_all(out))


@pytest.fixture
def config_file(tiny_raw, tmp_path) -> Path:
    from support.configs import write_toml

    tiny_raw["train"]["global_batch"] = 16
    return write_toml(tiny_raw, tmp_path / "tiny.toml")


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def check_pytorchjob(job: dict, min_nodes: int, max_nodes: int, nproc: int) -> dict:
    """The fields an elastic PyTorchJob must carry; returns the worker container."""
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    policy = job["spec"]["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d"
    assert (policy["minReplicas"], policy["maxReplicas"]) == (min_nodes, max_nodes)
    assert isinstance(policy["maxRestarts"], int) and policy["maxRestarts"] >= 0
    assert job["spec"]["nprocPerNode"] == str(nproc)
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == max_nodes
    pod = worker["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "pytorch"  # the operator looks for this container
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert "pytorchjob-port" in ports  # the operator derives PET_RDZV_ENDPOINT from it
    assert [ports[f"metrics-{r}"] for r in range(nproc)] == [
        int(annotations["prometheus.io/port"]) + r for r in range(nproc)
    ]
    assert container["command"][:3] == ["python", "-m", "launch.agent"]
    assert container["command"][-4:] == ["-m", "elastic.worker", "--config-json", "/etc/ecpt/config.json"]
    assert not any(c.startswith("--nnodes") or c.startswith("--rdzv-endpoint") for c in container["command"]), (
        "rendezvous flags would override the operator's PET_* settings"
    )
    res = container["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"] == res["requests"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/ecpt" and mounts["dshm"] == "/dev/shm" and "shared" in mounts
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["shared"]["persistentVolumeClaim"]["claimName"]
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    return container


def test_cpu_job_is_elastic_with_config_volume_and_metrics(config_file, capsys):
    docs = by_kind(render(capsys, config_file))
    assert set(docs) == {"ConfigMap", "PersistentVolumeClaim", "PyTorchJob"}
    job = docs["PyTorchJob"]
    container = check_pytorchjob(job, 2, 4, nproc=2)
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"

    cfg = json.loads(docs["ConfigMap"]["data"]["config.json"])
    assert cfg["launch"]["nnodes"] == "2:4" and cfg["launch"]["nproc_per_node"] == 2
    assert cfg["metrics"] == {"host": "0.0.0.0", "port": 9400, "enabled": True}
    assert cfg["train"]["run_dir"].startswith("/mnt/ecpt/")  # on the shared volume every pod mounts
    volumes = {v["name"]: v for v in job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    claim = docs["PersistentVolumeClaim"]
    assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_gpu_job_requests_gpus_and_one_worker_each(config_file, capsys):
    docs = by_kind(
        render(
            capsys,
            config_file,
            "--gpus-per-node",
            "4",
            "--namespace",
            "ml",
            "--pvc",
            "team-data",
            "--metrics-port",
            "9500",
        )
    )
    assert "PersistentVolumeClaim" not in docs  # an existing claim is used
    container = check_pytorchjob(docs["PyTorchJob"], 2, 4, nproc=4)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert all(d["metadata"]["namespace"] == "ml" for d in docs.values())
    claim = docs["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"][1]
    assert claim["persistentVolumeClaim"]["claimName"] == "team-data"
    assert json.loads(docs["ConfigMap"]["data"]["config.json"])["metrics"]["port"] == 9500


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--memory-per-node", "lots"], "--memory-per-node"),
        (["--job-name", "UPPER"], "--job-name"),
        (["--metrics-port", "80"], "--metrics-port"),
    ],
)
def test_bad_flags_name_the_flag(config_file, capsys, extra, message):
    code, _, err = launch(
        ["k8s", "--config", str(config_file), "--image", "x", "--min-nodes", "1", "--max-nodes", "2", *extra], capsys
    )
    assert code == 2 and message in err, err


def test_min_nodes_above_max_is_refused(config_file, capsys):
    code, _, err = launch(
        ["k8s", "--config", str(config_file), "--image", "x", "--min-nodes", "3", "--max-nodes", "2"], capsys
    )
    assert code == 2 and "--min-nodes" in err


def test_yaml_emitter_round_trips_awkward_values():
    doc = {
        "plain": "ReadWriteMany",
        "numberish": "100Gi",
        "int_string": "2",
        "bool_string": "true",
        "yes": "no",
        "colon": "a: b",
        "hash": "x #y",
        "empty": "",
        "list": [],
        "map": {},
        "none": None,
        "float": 0.5,
        "nested": [{"a": [1, [2, 3]], "b": {"c": "multi\nline\n"}}],
        "weird key: x": "-dash",
        "quote": 'say "hi"',
        "unicode": "naïve ✓",
        "block": '{\n  "k": 1\n}\n',
        "star": "*",
        "at": "@x",
    }
    assert yaml.safe_load(to_yaml([doc])) == doc


@pytest.mark.parametrize(
    "path,nproc,gpus", [("deploy/k8s/pytorchjob-cpu.yaml", 2, 0), ("deploy/k8s/pytorchjob-gpu.yaml", 8, 8)]
)
def test_example_manifests_in_deploy_carry_the_required_fields(path, nproc, gpus):
    docs = by_kind(list(yaml.safe_load_all((REPO / path).read_text())))
    job = docs["PyTorchJob"]
    policy = job["spec"]["elasticPolicy"]
    container = check_pytorchjob(job, policy["minReplicas"], policy["maxReplicas"], nproc)
    assert container["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
    json.loads(docs["ConfigMap"]["data"]["config.json"])


def test_replicas_mode_renders_the_coordinator_and_an_indexed_job_of_nodes(config_file, capsys):
    """launch.fault_tolerance = "replicas": no PyTorchJob (its agent restarts every worker on a failure); the quorum
    coordinator as a Deployment behind a Service the config points at, and one pod per node in an Indexed Job whose
    failed pods are replaced one index at a time, advertising their pod IP to peers."""
    docs = render(capsys, config_file, "--set", 'launch.fault_tolerance="replicas"')
    kinds = [d["kind"] for d in docs]
    assert kinds == ["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "Job"], kinds
    deployment, service, job = docs[2:]
    cfg = json.loads(docs[0]["data"]["config.json"])
    port = service["spec"]["ports"][0]["port"]
    assert cfg["launch"]["lighthouse"] == f"http://{service['metadata']['name']}:{port}"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items(), "the Service must select the coordinator"
    (coordinator,) = deployment["spec"]["template"]["spec"]["containers"]
    assert coordinator["command"][:4] == ["python", "-m", "launch.lighthouse", "lighthouse"]
    assert f"--port={port}" in coordinator["command"] and "--min-replicas=1" in coordinator["command"]

    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["maxFailedIndexes"] == 2  # MAX 4 - MIN 2 nodes may be lost for good
    assert spec["backoffLimitPerIndex"] == cfg["launch"]["max_restarts"]
    pod = spec["template"]
    assert pod["spec"]["restartPolicy"] == "Never"  # what backoffLimitPerIndex requires
    assert not service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), "nodes are not the Service"
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python", "-m", "launch.replicas_node", "--config", "/etc/ecpt/config.json"]
    env = {e["name"]: e for e in container["env"]}
    assert env["ECPT_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert {"config", "shared", "dshm"} <= volumes
    # two replica groups per pod (one per worker): two metrics ports, offset by the replica's slot on the node
    assert [p["containerPort"] for p in container["ports"]] == [9400, 9401]
