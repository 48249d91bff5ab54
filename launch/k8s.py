"""Render a Kubeflow PyTorchJob (kubeflow.org/v1) with an elasticPolicy, plus its ConfigMap and shared volume (in
replicas mode an Indexed Job and the quorum coordinator instead of the PyTorchJob: ``launch.k8s_replicas``).

The training operator sets torchrun's defaults through PET_* variables (PET_NNODES from min/maxReplicas,
PET_RDZV_ENDPOINT = <job>-worker-0:<port>, PET_RDZV_BACKEND, PET_MAX_RESTARTS, PET_NPROC_PER_NODE from
nprocPerNode, PET_RDZV_CONF from rdzvConf), so the container runs ``python -m launch.agent -m
elastic.worker`` without rendezvous flags and every pod joins the same c10d rendezvous. The resolved config is a
ConfigMap mounted at /etc/ecpt; the run directory (checkpoints, metrics log) and the corpus cache live on a
ReadWriteMany volume every pod mounts; /dev/shm is a memory volume big enough for the L0 checkpoint level.
Output is YAML written by a small emitter (no PyYAML needed); ``kubectl apply -f`` takes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from elastic.config import ConfigError
from launch.local import RDZV_CONF
from launch.spec import DEFAULT_METRICS_PORT, LaunchSpec

CONFIG_MOUNT = "/etc/ecpt"
SHARED_MOUNT = "/mnt/ecpt"
CONTAINER_NAME = "pytorch"
"""The operator finds the rendezvous port on the container named 'pytorch', port named 'pytorchjob-port'."""
RDZV_PORT_NAME = "pytorchjob-port"
_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")


@dataclass
class K8sOptions:
    image: str
    """Container image with ecpt installed (see deploy/docker/Dockerfile)."""
    namespace: str = ""
    """Namespace of every object; empty = kubectl's current namespace."""
    cpus_per_node: str = ""
    """CPU request and limit per pod; empty = 2 per CPU worker, 8 per GPU worker."""
    memory_per_node: str = ""
    """Memory request and limit per pod; empty = 4Gi per CPU worker, 32Gi per GPU worker."""
    shm_size: str = "8Gi"
    """Size of /dev/shm (memory volume): the L0 checkpoint level and NCCL live there."""
    storage: str = "100Gi"
    """Size of the shared volume created for the run directory, checkpoints and corpus cache."""
    storage_class: str = ""
    """StorageClass of the shared volume (must support ReadWriteMany); empty = the cluster default."""
    existing_claim: str = ""
    """Use this existing PersistentVolumeClaim instead of creating one."""
    metrics_port: int = DEFAULT_METRICS_PORT
    """Local rank r serves metrics on metrics_port + r."""

    def validate(self) -> None:
        if not self.image:
            raise ConfigError("--image is required: a container image with ecpt installed (deploy/docker/Dockerfile)")
        for flag, value in (
            ("--cpus-per-node", self.cpus_per_node),
            ("--memory-per-node", self.memory_per_node),
            ("--shm-size", self.shm_size),
            ("--storage", self.storage),
        ):
            if value and not _QUANTITY_RE.match(value):
                raise ConfigError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
        if not 1024 <= self.metrics_port <= 65000:
            raise ConfigError(f"--metrics-port must be in [1024, 65000], got {self.metrics_port}")


def container_config(spec: LaunchSpec, opts: K8sOptions) -> dict:
    """The resolved config as the pods see it: paths on the shared volume, metrics on every interface."""
    raw = spec.cfg.to_dict()
    raw["train"]["run_dir"] = f"{SHARED_MOUNT}/runs/{spec.job_name}"
    raw["data"]["cache_dir"] = f"{SHARED_MOUNT}/cache"
    raw["metrics"].update(host="0.0.0.0", port=opts.metrics_port, enabled=True)
    raw["train"]["progress"] = False  # pod logs are not a terminal: no progress bar redraws
    if spec.replicas:
        from launch.k8s_replicas import lighthouse_address

        raw["launch"]["lighthouse"] = lighthouse_address(spec)
    return raw


def _resources(spec: LaunchSpec, opts: K8sOptions) -> dict:
    n = spec.nproc_per_node
    cpus, memory_gi = (8, 32) if spec.gpus_per_node else (2, 4)  # per worker: GPU workers feed a device each
    amounts = {"cpu": opts.cpus_per_node or str(cpus * n), "memory": opts.memory_per_node or f"{memory_gi * n}Gi"}
    if spec.gpus_per_node:
        amounts["nvidia.com/gpu"] = spec.gpus_per_node
    # Requests equal limits: the pod gets the Guaranteed QoS class and is the last to be evicted.
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _container(spec: LaunchSpec, opts: K8sOptions) -> dict:
    ports = [{"name": RDZV_PORT_NAME, "containerPort": spec.rdzv_port, "protocol": "TCP"}]
    ports += [
        {"name": f"metrics-{r}", "containerPort": opts.metrics_port + r, "protocol": "TCP"}
        for r in range(spec.nproc_per_node)
    ]
    env = {
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "PYTHONUNBUFFERED": "1",
        "PET_MONITOR_INTERVAL": str(spec.cfg.launch.monitor_interval),
        **spec.env,
    }
    return {
        "name": CONTAINER_NAME,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": [
            "python",
            "-m",
            "launch.agent",
            "-m",
            "elastic.worker",
            "--config-json",
            f"{CONFIG_MOUNT}/config.json",
        ],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": ports,
        "resources": _resources(spec, opts),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "shared", "mountPath": SHARED_MOUNT},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }


def _claim_name(spec: LaunchSpec, opts: K8sOptions) -> str:
    return opts.existing_claim or f"{spec.job_name}-shared"


def _metadata(name: str, spec: LaunchSpec, opts: K8sOptions) -> dict:
    meta = {"name": name, "labels": {"app.kubernetes.io/name": "ecpt", "app.kubernetes.io/instance": spec.job_name}}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return meta


def _pod_volumes(spec: LaunchSpec, opts: K8sOptions) -> list[dict]:
    """The resolved config, the shared run directory and a memory-backed /dev/shm (L0), for every training pod."""
    return [
        {"name": "config", "configMap": {"name": f"{spec.job_name}-config"}},
        {"name": "shared", "persistentVolumeClaim": {"claimName": _claim_name(spec, opts)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}},
    ]


def pytorchjob(spec: LaunchSpec, opts: K8sOptions) -> dict:
    rdzv_conf = [{"key": k, "value": v} for k, v in (item.split("=") for item in RDZV_CONF.split(","))]
    pod = {
        "metadata": {
            "labels": {"app.kubernetes.io/name": "ecpt", "app.kubernetes.io/instance": spec.job_name},
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(opts.metrics_port),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": {"containers": [_container(spec, opts)], "volumes": _pod_volumes(spec, opts)},
    }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(spec.job_name, spec, opts),
        "spec": {
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "rdzvId": spec.job_name,
                "minReplicas": spec.min_nodes,
                "maxReplicas": spec.max_nodes,
                "maxRestarts": spec.cfg.launch.max_restarts,
                "rdzvConf": rdzv_conf,
            },
            "nprocPerNode": str(spec.nproc_per_node),
            "runPolicy": {"cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {
                "Worker": {"replicas": spec.max_nodes, "restartPolicy": "OnFailure", "template": pod}
            },
        },
    }


def configmap(spec: LaunchSpec, opts: K8sOptions) -> dict:
    text = json.dumps(container_config(spec, opts), indent=2) + "\n"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(f"{spec.job_name}-config", spec, opts),
        "data": {"config.json": text},
    }


def shared_claim(spec: LaunchSpec, opts: K8sOptions) -> dict:
    claim = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": opts.storage}}}
    if opts.storage_class:
        claim["storageClassName"] = opts.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(_claim_name(spec, opts), spec, opts),
        "spec": claim,
    }


def manifests(spec: LaunchSpec, opts: K8sOptions) -> list[dict]:
    """ConfigMap, shared PersistentVolumeClaim (unless an existing one is named) and the PyTorchJob; in replicas
    mode the coordinator's Deployment and Service and an Indexed Job instead of the PyTorchJob
    (``launch.k8s_replicas``)."""
    opts.validate()
    docs = [configmap(spec, opts)]
    if not opts.existing_claim:
        docs.append(shared_claim(spec, opts))
    if spec.replicas:
        from launch.k8s_replicas import replicas_manifests

        return docs + replicas_manifests(spec, opts)
    return docs + [pytorchjob(spec, opts)]


# --------------------------------------------------------------------------------------------------------------
# A small YAML emitter: block mappings and sequences; strings double-quoted as JSON (a subset of YAML), multi-line
# strings as literal blocks so the ConfigMap's config.json stays readable.

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")


_PLAIN_STR = re.compile(r"^[A-Za-z/][A-Za-z0-9_./-]*(:[A-Za-z0-9_./-]+)*$")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    text = str(value)
    if _PLAIN_STR.match(text) and text.lower() not in _RESERVED:
        return text  # plain scalar: starts with a letter or '/', no spaces, no ': ' or '#'
    return json.dumps(text)


def _key(key: str) -> str:
    return key if _PLAIN_KEY.match(key) and key.lower() not in _RESERVED else json.dumps(key)


def _literal_ok(text: str) -> bool:
    lines = text.split("\n")
    return (
        "\n" in text.rstrip("\n")
        and text.endswith("\n")
        and not text.endswith("\n\n")
        and not text[0].isspace()
        and all(line == line.rstrip() for line in lines)
        and "\t" not in text
    )


def _emit(value, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        out = []
        for k, v in value.items():
            out += _emit_entry(f"{pad}{_key(str(k))}:", v, indent)
        return out
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        out = []
        for item in value:
            lines = _emit(item, indent + 2)
            out.append(pad + "- " + lines[0][indent + 2 :])
            out += lines[1:]
        return out
    return [pad + _scalar(value)]


def _emit_entry(head: str, value, indent: int) -> list[str]:
    if isinstance(value, str) and _literal_ok(value):
        return [head + " |"] + [" " * (indent + 2) + line for line in value.rstrip("\n").split("\n")]
    if isinstance(value, (dict, list)) and value:
        return [head] + _emit(value, indent + 2)
    return [head + " " + _emit(value, 0)[0]]


def to_yaml(docs: list[dict]) -> str:
    """A YAML stream of ``docs`` (each starts with ---)."""
    return "".join("---\n" + "\n".join(_emit(doc, 0)) + "\n" for doc in docs)
