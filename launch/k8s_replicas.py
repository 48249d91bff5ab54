"""Kubernetes objects for replicas mode (``launch.fault_tolerance = "replicas"``): the quorum coordinator as a
Deployment behind a Service, and the training nodes as an Indexed Job.

Why not the PyTorchJob of the restart mode: its elastic agent restarts every worker of the job on a failure, which
is what replicas mode avoids. Here every pod is one node running ``python -m launch.replicas_node``: its share of the
replica groups (one torchrun agent and worker each), node rank = the pod's completion index (JOB_COMPLETION_INDEX,
set by the Job controller). What happens on a failure:
- a worker dies: its agent restarts it in the pod (launch.max_restarts); it heals from a live peer;
- a pod or its node dies: the survivors go on at the next step; the Job controller starts a new pod with the same
  index (``backoffLimitPerIndex``), which joins and heals from a peer, reading nothing from disk;
- an index that keeps failing is given up after launch.max_restarts pods, and the job continues as long as at most
  MAX - MIN indexes failed (``maxFailedIndexes``).

Peers reach each other at the pod IP (ECPT_ADVERTISE_HOST from the downward API): a pod's hostname resolves only
inside itself. The coordinator outlives the pods; delete it with the job (``kubectl delete -f``). Needs Kubernetes
1.29+ (backoffLimitPerIndex).
"""

from __future__ import annotations

from launch.k8s import CONFIG_MOUNT, K8sOptions, _container, _metadata, _pod_volumes
from launch.spec import LaunchSpec

LIGHTHOUSE_PORT = 29510
"""The coordinator's port in its pod and on its Service."""
ADVERTISE_FROM_POD_IP = {"name": "ECPT_ADVERTISE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def lighthouse_address(spec: LaunchSpec) -> str:
    """The coordinator's address as the training pods see it (its Service, in the job's namespace)."""
    return f"http://{spec.job_name}-lighthouse:{LIGHTHOUSE_PORT}"


def _labels(spec: LaunchSpec, component: str) -> dict:
    return {
        "app.kubernetes.io/name": "ecpt",
        "app.kubernetes.io/instance": spec.job_name,
        "app.kubernetes.io/component": component,
    }


def lighthouse_deployment(spec: LaunchSpec, opts: K8sOptions) -> dict:
    launch = spec.cfg.launch
    container = {
        "name": "lighthouse",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": [
            "python",
            "-m",
            "launch.lighthouse",
            "lighthouse",
            "--host=0.0.0.0",
            f"--port={LIGHTHOUSE_PORT}",
            f"--min-replicas={launch.min_replicas}",
            f"--heartbeat-timeout-ms={launch.ft_heartbeat_timeout_ms}",
            f"--join-timeout-ms={launch.ft_join_timeout_ms}",
        ],
        "env": [{"name": "RUST_LOG", "value": "warn"}, {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "ports": [{"name": "lighthouse", "containerPort": LIGHTHOUSE_PORT, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": LIGHTHOUSE_PORT}, "periodSeconds": 2},
        # one small Rust server: a quorum per step is a few messages per replica
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
    }
    labels = _labels(spec, "lighthouse")
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(f"{spec.job_name}-lighthouse", spec, opts),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def lighthouse_service(spec: LaunchSpec, opts: K8sOptions) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(f"{spec.job_name}-lighthouse", spec, opts),
        "spec": {
            "selector": _labels(spec, "lighthouse"),
            "ports": [{"name": "lighthouse", "port": LIGHTHOUSE_PORT, "targetPort": LIGHTHOUSE_PORT}],
        },
    }


def replica_nodes_job(spec: LaunchSpec, opts: K8sOptions) -> dict:
    container = _container(spec, opts)
    container["command"] = ["python", "-m", "launch.replicas_node", "--config", f"{CONFIG_MOUNT}/config.json"]
    container["env"] = [*container["env"], ADVERTISE_FROM_POD_IP]
    # torchrun's rendezvous port is per replica group inside the pod here: only the metrics ports are exposed
    container["ports"] = [p for p in container["ports"] if p["name"].startswith("metrics-")]
    launch = spec.cfg.launch
    labels = _labels(spec, "node")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(spec.job_name, spec, opts),
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.max_nodes,
            "parallelism": spec.max_nodes,
            "backoffLimitPerIndex": launch.max_restarts,
            "maxFailedIndexes": spec.max_nodes - spec.min_nodes,
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(opts.metrics_port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "restartPolicy": "Never",  # a failed pod is replaced by a new one with its index (required)
                    "containers": [container],
                    "volumes": _pod_volumes(spec, opts),
                },
            },
        },
    }


def replicas_manifests(spec: LaunchSpec, opts: K8sOptions) -> list[dict]:
    """The coordinator's Deployment and Service, then the nodes' Indexed Job."""
    return [lighthouse_deployment(spec, opts), lighthouse_service(spec, opts), replica_nodes_job(spec, opts)]
