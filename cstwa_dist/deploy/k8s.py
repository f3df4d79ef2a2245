"""Kubernetes manifests for one multi-node job: N nodes x G GPUs (or CPU ranks), from one command.

    python launchers/render_k8s.py --name retrain --nodes 8 --gpus-per-node 8 --image IMG \\
        --config configs/aliccp.yaml --data-pvc data --runs-pvc runs --command "train --model cstwa" \\
        --out runs/k8s/retrain

writes ``00-configmap.yaml``, ``01-networkpolicy.yaml``, ``02-service.yaml``, ``03-job.yaml`` (``--out -``:
all four to stdout), in apply order: the NetworkPolicy exists before any pod does.

Why an Indexed Job + headless Service and not a Kubeflow PyTorchJob: both are core ``batch/v1`` and
``v1`` objects, so the job runs on any cluster without installing an operator and its CRDs, and the
manifests validate offline against the Kubernetes schemas. The Indexed Job gives each pod what the
launcher needs: a completion index (``NODE_RANK``) and a stable hostname ``<name>-<index>``, which the
headless Service (the pods' ``subdomain``) makes resolvable, so ``<name>-0.<name>-nodes`` is the
rendezvous endpoint every pod is given. PyTorchJob would add operator-managed restarts and elastic
policies; the Job's own retries already continue a run: ``train`` is rendered with ``--resume auto``
(the newest complete checkpoint under ``train.checkpoint_dir`` on the runs volume) and ``backoffLimit``
allows a few whole-job failures, so a failed pod is replaced and the retrain goes on where it was.

On a shared cluster no other workload may reach the job's ports (pod 0's rendezvous store, gloo's and
NCCL's ephemeral ports): the store and the collectives take unauthenticated connections. The
NetworkPolicy admits only the job's own pods. Finished Jobs are garbage-collected
(``ttlSecondsAfterFinished``), and the pod's local disk use (``/tmp``, logs) is requested and capped
(``ephemeral-storage``) so the scheduler places it where there is room and it cannot fill the node.

Each pod runs ``launchers/torchrun.sh G COMMAND ...``: the node-local Ray runtime, then torchrun
with ``--nproc_per_node`` = the pod's GPU request (or ``--cpu-ranks`` on CPU nodes). The
renderer checks at render time what would otherwise fail on the cluster after scheduling: the command
and its options (parsed by the CLI's own parser), the config and ``--set`` overrides (loaded as the
ranks will load them), that every path the job reads or writes lies on a mounted volume (the root
filesystem is read-only; checkpoints and ``--resume DIR`` included), that the ConfigMap holds nothing
that looks like a secret, and the sizes.
"""

from __future__ import annotations

import argparse
import logging
import math
import posixpath
import re
import shlex
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

RENDER_COMMAND = "python launchers/render_k8s.py"
CONFIG_DIR = "/etc/cstwa-dist"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
GPU_RESOURCE = "nvidia.com/gpu"
APP = "cstwa-dist"
# The optional checkpoint-signing key (--checkpoint-key-secret): a Secret mounted read-only as a file, its
# path passed in this variable. A file rather than the key itself in an env var: env is inherited by every
# child process (torchrun's workers, Ray's) and readable in /proc/<pid>/environ, and a mounted Secret is
# updated in place when it is rotated. The training side reads the same variable; keep the names aligned.
CHECKPOINT_KEY_FILE_ENV = "CSTWA_CHECKPOINT_KEY_FILE"
CHECKPOINT_KEY_DIR = "/var/run/secrets/cstwa-dist/checkpoint"
CHECKPOINT_KEY_ITEM = "key"  # the Secret's data key holding the signing key
# Local disk a pod writes besides /tmp: container logs (rotated by the kubelet) and the (read-only)
# root filesystem's writable layer.
LOG_MARGIN = 2**30
# Key names that would mean a credential went into a ConfigMap (readable by anyone who can read the
# namespace's ConfigMaps, printed by `kubectl describe`): those belong in a Secret.
SECRET_KEY = re.compile(
    r"passw(or)?d|secret|token|credential|api[-_]?key|private[-_]?key|access[-_]?key", re.IGNORECASE
)
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_CPU = re.compile(r"\d+(?:\.\d+)?m?")
_UNIT = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
# Liveness: this pod's torchrun agent and its node-local Ray raylet both run. The bracket keeps grep from
# matching the probe's own command line (which /proc also lists).
LIVENESS_SCRIPT = (
    "grep -qsa '[b]in/torchrun' /proc/[0-9]*/cmdline && grep -qsa '[r]aylet' /proc/[0-9]*/cmdline"
)


def quantity_bytes(q: str) -> float:
    """Bytes in a Kubernetes memory quantity (``64Gi``, ``500M``, ``1024``); ValueError otherwise."""
    m = _QUANTITY.fullmatch(q)
    if not m:
        raise ValueError(f"{q!r} is not a memory quantity like 64Gi or 500M")
    return float(m.group(1)) * _UNIT[m.group(2)]


@dataclass(frozen=True, kw_only=True)
class K8sJob:
    """Everything the manifests depend on; the defaults that depend on the profile are resolved below."""

    name: str
    nodes: int
    gpus_per_node: int
    image: str
    config: Path
    command: tuple[str, ...]
    data_pvc: str
    runs_pvc: str
    cpu_ranks: int = 2
    namespace: str | None = None
    workdir: str = "/opt/cstwa-dist"
    venv: str = ".venv"
    port: int = 29500
    cpu: str | None = None
    memory: str | None = None
    shm_size: str | None = None
    tmp_size: str = "20Gi"
    ray_cpus: int | None = None
    ray_start_timeout: int = 120
    max_restarts: int = 0
    backoff_limit: int | None = None
    ttl_after_finished: int = 7 * 24 * 3600
    ephemeral_storage: str | None = None
    checkpoint_key_secret: str | None = None
    uid: int = 1000
    gid: int = 1000
    node_selector: tuple[tuple[str, str], ...] = ()
    image_pull_secret: str | None = None

    @property
    def nproc(self) -> int:
        """Ranks per pod: one per GPU, or ``cpu_ranks`` on CPU nodes."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.cpu_ranks

    @property
    def service(self) -> str:
        return f"{self.name}-nodes"

    @property
    def configmap(self) -> str:
        return f"{self.name}-config"

    @property
    def config_key(self) -> str:
        return self.config.name

    @property
    def config_path(self) -> str:
        return f"{CONFIG_DIR}/{self.config_key}"

    @property
    def master_addr(self) -> str:
        """Pod 0 through the headless Service: resolvable from every pod of the namespace."""
        return f"{self.name}-0.{self.service}"

    @property
    def rdzv_endpoint(self) -> str:
        return f"{self.master_addr}:{self.port}"

    @property
    def ray_num_cpus(self) -> int:
        """One reader CPU per rank by default (at least the launcher's 2)."""
        return self.ray_cpus if self.ray_cpus is not None else max(2, self.nproc)

    @property
    def cpu_request(self) -> str:
        per_rank = 4 if self.gpus_per_node > 0 else 1
        return self.cpu or str(per_rank * self.nproc + self.ray_num_cpus)

    @property
    def memory_request(self) -> str:
        return self.memory or f"{(32 if self.gpus_per_node > 0 else 4) * self.nproc}Gi"

    @property
    def shm(self) -> str:
        """Half the memory by default: Ray's object store takes 30 % of it and falls back to /tmp (slow)
        when /dev/shm is smaller; tmpfs pages count against the memory limit only once written."""
        if self.shm_size:
            return self.shm_size
        return f"{max(1, int(quantity_bytes(self.memory_request) / 2**31))}Gi"

    @property
    def backoff(self) -> int:
        """Pod failures the Job tolerates: three whole-job failures by default. One failed rank usually
        fails every pod (their collectives lose a peer), and each counts once."""
        return self.backoff_limit if self.backoff_limit is not None else 3 * self.nodes

    @property
    def ephemeral(self) -> str:
        """Local disk request = limit: the /tmp emptyDir (disk-backed) plus logs."""
        if self.ephemeral_storage:
            return self.ephemeral_storage
        return f"{math.ceil((quantity_bytes(self.tmp_size) + LOG_MARGIN) / 2**30)}Gi"

    @property
    def network_policy(self) -> str:
        return f"{self.name}-pods"

    @property
    def labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": APP, "app.kubernetes.io/instance": self.name}

    @property
    def pod_labels(self) -> dict[str, str]:
        return {**self.labels, "app.kubernetes.io/component": "trainer"}


def _metadata(job: K8sJob, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if job.namespace:
        meta["namespace"] = job.namespace
    meta["labels"] = job.labels
    return meta


def _normpath(workdir: str, path: str) -> str:
    return posixpath.normpath(posixpath.join(workdir, path))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def _secret_keys(node: Any, where: str = "") -> list[str]:
    if isinstance(node, dict):
        found = []
        for k, v in node.items():
            here = f"{where}.{k}" if where else str(k)
            if SECRET_KEY.search(str(k)):
                found.append(here)
            found += _secret_keys(v, here)
        return found
    if isinstance(node, list):
        return [f for i, v in enumerate(node) for f in _secret_keys(v, f"{where}[{i}]")]
    return []


def check(job: K8sJob) -> None:
    """Raises ValueError for anything the cluster would reject or the job would fail on after scheduling."""
    if not _DNS_LABEL.fullmatch(job.name):
        raise ValueError(f"--name {job.name!r} must be a DNS label: lower-case letters, digits, '-'")
    if job.nodes < 1 or job.gpus_per_node < 0 or job.cpu_ranks < 1:
        raise ValueError("--nodes and --cpu-ranks must be >= 1 and --gpus-per-node >= 0")
    longest = max(len(job.service), len(f"{job.name}-{job.nodes - 1}"))
    if longest > 63:
        raise ValueError(
            f"--name {job.name!r} is too long: pod hostnames and the Service name must fit "
            f"63 characters ({longest})"
        )
    for what, value in (("--data-pvc", job.data_pvc), ("--runs-pvc", job.runs_pvc)):
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value):
            raise ValueError(f"{what} {value!r} is not a PersistentVolumeClaim name")
    if not 1 <= job.port <= 65535:
        raise ValueError(f"--port {job.port} is not a TCP port")
    if job.venv.startswith("/") or ".." in job.venv.split("/"):
        raise ValueError(
            "--venv must be relative to --workdir: launchers/torchrun.sh puts $PWD/$VENV/bin on PATH"
        )
    if not job.workdir.startswith("/"):
        raise ValueError("--workdir must be absolute")
    if job.uid == 0:
        raise ValueError("--uid 0 is root; the pods run as non-root")
    if not _CPU.fullmatch(job.cpu_request):
        raise ValueError(f"--cpu {job.cpu_request!r} is not a CPU quantity like 16 or 500m")
    memory = quantity_bytes(job.memory_request)
    if quantity_bytes(job.ephemeral) < quantity_bytes(job.tmp_size):
        raise ValueError(
            f"--ephemeral-storage {job.ephemeral} must be at least --tmp-size {job.tmp_size}: /tmp is a "
            "disk-backed emptyDir, and a pod past its ephemeral-storage limit is evicted"
        )
    if job.backoff < 0 or job.ttl_after_finished < 0 or job.max_restarts < 0:
        raise ValueError("--backoff-limit, --ttl-after-finished and --max-restarts must be >= 0")
    if job.checkpoint_key_secret is not None and not re.fullmatch(
        r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", job.checkpoint_key_secret
    ):
        raise ValueError(f"--checkpoint-key-secret {job.checkpoint_key_secret!r} is not a Secret name")
    if quantity_bytes(job.shm) >= memory:
        raise ValueError(
            f"--shm-size {job.shm} must be below --memory {job.memory_request}: /dev/shm is "
            "memory-backed and counts against the pod's memory limit"
        )
    if not re.fullmatch(r"[-._a-zA-Z0-9]+", job.config_key):
        raise ValueError(f"config file name {job.config_key!r} is not a valid ConfigMap key")
    _check_command_and_config(job)


def _parse_and_load(job: K8sJob) -> tuple[argparse.Namespace, Any]:
    """The command parsed by the CLI's parser and the config loaded as the ranks will load it."""
    from cstwa_dist.cli import build_parser
    from cstwa_dist.config import ConfigError
    from cstwa_dist.registry import load_config  # checks the models' own settings too

    argv = [*job.command, "--config", str(job.config)]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has already written its message to stderr
        raise ValueError(
            f"--command {shlex.join(job.command)!r} is not a cstwa-dist command that takes "
            "--config (pretrain, train, experiment; see `cstwa-dist --help`)"
        ) from e
    try:
        cfg = load_config(job.config, getattr(args, "overrides", None))
    except ConfigError as e:
        raise ValueError(f"config: {e}") from e
    return args, cfg


def _resume(job: K8sJob, args: argparse.Namespace, cfg: Any) -> str | None:
    """What a ``train`` command resumes from where the command or config chose it (``--resume``, or
    ``train.resume`` in the config file or a ``--set``), else None: the renderer then adds ``--resume
    auto``. None for the other commands."""
    if args.command != "train":
        return None
    if args.resume:
        return str(args.resume)
    raw = yaml.safe_load(job.config.read_text()) or {}
    chosen = "resume" in (raw.get("train") or {}) or any(
        o.partition("=")[0].strip() == "train.resume" for o in args.overrides
    )
    return str(cfg.train.resume) if chosen else None


def rendered_command(job: K8sJob) -> list[str]:
    """The command the pods run (without --config): ``train`` gets ``--resume auto`` unless the command
    or config already says where to resume from, so that a replaced pod continues the run instead of
    starting it again (the Job retries failed pods, ``backoffLimit``)."""
    args, cfg = _parse_and_load(job)
    if args.command == "train" and _resume(job, args, cfg) is None:
        return [*job.command, "--resume", "auto"]
    return list(job.command)


def _check_command_and_config(job: K8sJob) -> None:
    """Parses the command with the CLI's parser and loads the config as the ranks will: a typo fails here,
    not after N pods have been scheduled and have started their Ray runtimes."""
    if any(t == "--config" or t.startswith("--config=") for t in job.command):
        raise ValueError("--command must not contain --config: the renderer passes the ConfigMap's file")
    if not job.config.is_file():
        raise ValueError(f"config file not found: {job.config}")
    raw = yaml.safe_load(job.config.read_text()) or {}
    secrets = _secret_keys(raw)
    if secrets:
        raise ValueError(
            f"{job.config}: keys {secrets} look like credentials; a ConfigMap is not the place "
            "for them (use a Secret mounted separately)"
        )
    args, cfg = _parse_and_load(job)
    data, runs = _normpath(job.workdir, "data"), _normpath(job.workdir, "runs")
    reads = {"data.dataset": cfg.data.dataset}
    writes = {"train.run_dir": cfg.train.run_dir, "structure.graph_dir": cfg.structure.graph_dir}
    if cfg.train.checkpoint_dir:  # default <run dir>/checkpoints: on the runs volume with the run dir
        writes["train.checkpoint_dir"] = cfg.train.checkpoint_dir
    resume = _resume(job, args, cfg)
    if resume not in (None, "auto", "never"):  # a checkpoint folder: read, never written
        reads["--resume" if args.resume else "train.resume"] = resume
    for opt in ("run_dir", "out"):  # train --run-dir, experiment --out
        if getattr(args, opt, None):
            writes[f"--{opt.replace('_', '-')}"] = str(getattr(args, opt))
    for key, path in reads.items():
        p = _normpath(job.workdir, path)
        if not (_under(p, data) or _under(p, runs)):
            raise ValueError(
                f"{key} = {path!r} resolves to {p}, outside the data ({data}) and runs ({runs}) "
                "volumes; the pods could not read it"
            )
    for key, path in writes.items():
        p = _normpath(job.workdir, path)
        if not _under(p, runs):
            raise ValueError(
                f"{key} = {path!r} resolves to {p}, outside the runs volume ({runs}); the pods' "
                "root filesystem is read-only"
            )
    if resume == "never" and job.backoff > 0:
        logger.warning(
            "resume is 'never' (--resume or train.resume): a pod the Job retries starts the run "
            "again from epoch 0; leave it out to get --resume auto"
        )


def _env(job: K8sJob) -> list[dict[str, Any]]:
    plain = {
        "NNODES": job.nodes,
        "MASTER_ADDR": job.master_addr,
        "MASTER_PORT": job.port,
        "RDZV_ENDPOINT": job.rdzv_endpoint,
        "JOB_ID": job.name,
        "MAX_RESTARTS": job.max_restarts,
        "RAY_NUM_CPUS": job.ray_num_cpus,
        "RAY_START_TIMEOUT": job.ray_start_timeout,
        "VENV": job.venv,
        "HOME": "/tmp",
        "XDG_CACHE_HOME": "/tmp/.cache",
        "MPLCONFIGDIR": "/tmp/.config/matplotlib",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if job.checkpoint_key_secret:
        plain[CHECKPOINT_KEY_FILE_ENV] = f"{CHECKPOINT_KEY_DIR}/{CHECKPOINT_KEY_ITEM}"
    env: list[dict[str, Any]] = [{"name": k, "value": str(v)} for k, v in plain.items()]
    node_rank = {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}
    env.insert(1, {"name": "NODE_RANK", "valueFrom": node_rank})
    # Every listening socket of the job on the pod's own address, not on every interface: the
    # rendezvous store of pod 0 (RDZV_BIND_ADDR, cstwa_dist/distributed/rendezvous.py) and each pod's
    # rank-0 store (LOCAL_ADDR → torchrun's --local_addr → MASTER_ADDR of the ranks). The pod IP comes
    # from the downward API, so neither waits for the headless Service's DNS record.
    env.append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    env.append({"name": "RDZV_BIND_ADDR", "value": "$(POD_IP)"})
    env.append({"name": "LOCAL_ADDR", "value": "$(POD_IP)"})
    return env


def _probe(job: K8sJob, *, startup: bool) -> dict[str, Any]:
    probe: dict[str, Any] = {"exec": {"command": ["bash", "-c", LIVENESS_SCRIPT]}, "timeoutSeconds": 10}
    if startup:  # Ray's start (up to RAY_START_TIMEOUT) plus two minutes for torchrun's imports
        probe |= {"periodSeconds": 10, "failureThreshold": math.ceil((job.ray_start_timeout + 120) / 10)}
    else:
        probe |= {"periodSeconds": 30, "failureThreshold": 3}
    return probe


def _network_policy(job: K8sJob) -> dict[str, Any]:
    """Ingress to the job's pods only from the job's pods, on every TCP port: the rendezvous store is on
    a fixed port, but gloo and NCCL's socket transport listen on ephemeral ones. Egress stays open:
    the job needs only its peers and DNS, but where DNS answers (CoreDNS pods, a node-local cache on a
    link-local address, its port after the Service's NAT) differs between clusters, and a wrong guess
    would fail the rendezvous at start-up; the exposure this closes is inbound."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(job, job.network_policy),
        "spec": {
            "podSelector": {"matchLabels": job.pod_labels},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": job.pod_labels}}], "ports": [{"protocol": "TCP"}]}
            ],
        },
    }


def build_objects(job: K8sJob) -> list[dict[str, Any]]:
    """The four objects, in apply order: ConfigMap, NetworkPolicy, headless Service, Indexed Job. Call
    ``check`` first."""
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, job.configmap),
        "immutable": True,
        "data": {job.config_key: job.config.read_text()},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, job.service),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": job.labels,
            "ports": [{"name": "rdzv", "port": job.port, "targetPort": job.port, "protocol": "TCP"}],
        },
    }
    resources: dict[str, Any] = {
        "requests": {
            "cpu": job.cpu_request,
            "memory": job.memory_request,
            "ephemeral-storage": job.ephemeral,
        },
        "limits": {"memory": job.memory_request, "ephemeral-storage": job.ephemeral},
    }
    if job.gpus_per_node > 0:
        resources["limits"][GPU_RESOURCE] = job.gpus_per_node
    container = {
        "name": "trainer",
        "image": job.image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": job.workdir,
        "command": ["bash", "launchers/torchrun.sh"],
        "args": [str(job.nproc), *rendered_command(job), "--config", job.config_path],
        "ports": [{"name": "rdzv", "containerPort": job.port, "protocol": "TCP"}],
        "env": _env(job),
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": job.uid,
            "runAsGroup": job.gid,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "startupProbe": _probe(job, startup=True),
        "livenessProbe": _probe(job, startup=False),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "data", "mountPath": _normpath(job.workdir, "data"), "readOnly": True},
            {"name": "runs", "mountPath": _normpath(job.workdir, "runs")},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    if job.checkpoint_key_secret:
        container["volumeMounts"].append(
            {"name": "checkpoint-key", "mountPath": CHECKPOINT_KEY_DIR, "readOnly": True}
        )
    pod_spec: dict[str, Any] = {
        "subdomain": job.service,
        "setHostnameAsFQDN": False,
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": job.uid,
            "runAsGroup": job.gid,
            "fsGroup": job.gid,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if job.node_selector:
        pod_spec["nodeSelector"] = dict(job.node_selector)
    if job.gpus_per_node > 0:
        pod_spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    if job.image_pull_secret:
        pod_spec["imagePullSecrets"] = [{"name": job.image_pull_secret}]
    pod_spec["containers"] = [container]
    pod_spec["volumes"] = [
        {
            "name": "config",
            "configMap": {"name": job.configmap, "items": [{"key": job.config_key, "path": job.config_key}]},
        },
        {"name": "data", "persistentVolumeClaim": {"claimName": job.data_pvc, "readOnly": True}},
        {"name": "runs", "persistentVolumeClaim": {"claimName": job.runs_pvc}},
        {"name": "tmp", "emptyDir": {"sizeLimit": job.tmp_size}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": job.shm}},
    ]
    if job.checkpoint_key_secret:  # owner root, group fsGroup: 0440 lets the pod's group read it
        secret = {
            "secretName": job.checkpoint_key_secret,
            "items": [{"key": CHECKPOINT_KEY_ITEM, "path": CHECKPOINT_KEY_ITEM}],
            "defaultMode": 0o440,
        }
        pod_spec["volumes"].append({"name": "checkpoint-key", "secret": secret})
    k8s_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, job.name),
        "spec": {
            "completionMode": "Indexed",
            "completions": job.nodes,
            "parallelism": job.nodes,
            "backoffLimit": job.backoff,
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
                ]
            },
            "podReplacementPolicy": "Failed",
            "ttlSecondsAfterFinished": job.ttl_after_finished,
            "template": {"metadata": {"labels": job.pod_labels}, "spec": pod_spec},
        },
    }
    return [configmap, _network_policy(job), service, k8s_job]


def render(job: K8sJob) -> list[dict[str, Any]]:
    """Checks ``job`` and returns its objects (ConfigMap, NetworkPolicy, Service, Job)."""
    check(job)
    return build_objects(job)


# Comments above the first (or n-th) line setting a key, wrapped to the manifest's width: PyYAML cannot
# emit comments, and the manifests are read by people deciding whether to apply them.
_NOTES: dict[str, list[tuple[str, int, str]]] = {
    "ConfigMap": [
        (
            "immutable",
            0,
            f"The config every node reads (mounted at {CONFIG_DIR}, passed as --config). Immutable, so a "
            "replacement pod can never read another config than its peers: to change it, delete the job and "
            "apply again. No secrets here: the renderer refuses credential-like keys; credentials belong in "
            "a Secret mounted separately.",
        ),
    ],
    "NetworkPolicy": [
        (
            "podSelector",
            0,
            "This job's pods (the Job's pod-template labels; the Service selects them too). Applied before "
            "the Job, so no pod of it ever runs unprotected. Needs a network plugin that enforces "
            "NetworkPolicy (Calico, Cilium, ...); without one it is accepted and has no effect.",
        ),
        (
            "policyTypes",
            0,
            "Ingress only. Egress stays open: the job needs only its peers and DNS, but where DNS answers "
            "differs between clusters (CoreDNS pods, a node-local cache on a link-local address) and a "
            "wrong guess would fail the rendezvous at start-up.",
        ),
        (
            "ingress",
            0,
            "Only from this job's pods in this namespace, on every TCP port: pod 0's rendezvous store is on "
            "the rendezvous port, but gloo and NCCL's socket transport listen on ephemeral ports. "
            "Nothing else reaches these pods (their ports take unauthenticated connections). RDMA "
            "(InfiniBand, RoCE) bypasses the pod network and NetworkPolicy altogether.",
        ),
    ],
    "Service": [
        (
            "clusterIP",
            0,
            "Headless: no virtual IP; DNS answers <job>-<index>.<service> with that pod's own address (the "
            "pods set subdomain: <service>). The rendezvous is pod 0's TCP store: it must be reached "
            "directly, not through a load-balanced VIP.",
        ),
        (
            "publishNotReadyAddresses",
            0,
            "Publish each pod's address as soon as it has one: the rendezvous happens at start-up, before "
            "and regardless of readiness.",
        ),
    ],
    "Job": [
        (
            "completionMode",
            0,
            "Indexed: pod i gets completion index i (its NODE_RANK) and the stable hostname <job>-i. "
            "completions = parallelism = NNODES: all nodes run at once; the job succeeds when every index "
            "has exited 0.",
        ),
        (
            "backoffLimit",
            0,
            "Pod failures tolerated before the Job fails: 3 x NNODES by default, three whole-job failures "
            "(one failed rank usually fails every pod: their collectives lose a peer). A replaced pod "
            "continues the run: `train` runs with --resume auto (the newest complete checkpoint under "
            "train.checkpoint_dir, default <run dir>/checkpoints on the runs volume); `experiment` skips "
            "finished cells; `pretrain` starts again.",
        ),
        (
            "podFailurePolicy",
            0,
            "A pod that fails because it was disrupted (preempted, its node drained, evicted under node "
            "pressure) does not count against backoffLimit: it is replaced and the run resumes. One evicted "
            "for passing its own ephemeral-storage limit does count.",
        ),
        (
            "podReplacementPolicy",
            0,
            "A failed pod is replaced only once it has fully terminated, so <job>-0's DNS name never "
            "points at two pods (Kubernetes >= 1.29).",
        ),
        (
            "ttlSecondsAfterFinished",
            0,
            "The finished Job and its pods (and their logs) are deleted after this long "
            "(--ttl-after-finished, default 7 days); results and checkpoints stay on the runs volume, "
            "the ConfigMap, NetworkPolicy and Service stay until `kubectl delete -f`.",
        ),
        (
            "subdomain",
            0,
            "= the headless Service: with the Indexed Job's hostname <job>-<index> this makes "
            "<job>-<index>.<service> resolvable in the namespace. setHostnameAsFQDN stays false: the short "
            "name resolves through /etc/hosts and the DNS search path, and an FQDN hostname can pass the "
            "64-character limit.",
        ),
        (
            "automountServiceAccountToken",
            0,
            "The trainer never calls the Kubernetes API: no token in the pod.",
        ),
        (
            "securityContext",
            0,
            "Restricted Pod Security Standard: non-root uid/gid (the image's venv must be readable by it); "
            "fsGroup makes the runs volume writable, OnRootMismatch avoids re-chowning a large volume at "
            "every start.",
        ),
        ("tolerations", 0, "GPU nodes are usually tainted nvidia.com/gpu:NoSchedule."),
        (
            "env",
            0,
            "launchers/torchrun.sh's contract. Every pod gets the same endpoint, pod 0 through the headless "
            "Service: RDZV_ENDPOINT = MASTER_ADDR:MASTER_PORT. NODE_RANK = the completion index. With "
            "RDZV_ENDPOINT set, torchrun.sh uses the c10d rendezvous (id JOB_ID, store hosted by NODE_RANK "
            "0, MAX_RESTARTS in-place restarts of every node's workers); MASTER_ADDR, MASTER_PORT and "
            "NODE_RANK alone are the static rendezvous. The node-local Ray runtime (ray start --head on "
            "127.0.0.1: RAY_NODE_IP stays unset, the ranks attach from the same pod, and only on loopback "
            "does Ray bind its ports to one address) gets RAY_NUM_CPUS; HOME and caches point at /tmp: the "
            "root filesystem is read-only.",
        ),
        (
            "resources",
            0,
            "One pod per node. nvidia.com/gpu (when present) = torchrun's --nproc_per_node. The memory limit "
            "includes /dev/shm (tmpfs pages count once written). ephemeral-storage: the disk-backed /tmp "
            "plus logs, requested so the pod lands where there is room, capped so it cannot fill the node's "
            "disk. No CPU limit: throttling slows ranks unevenly and the slowest rank sets every "
            "collective's pace.",
        ),
        ("securityContext", 1, "Nothing is written to the image: /tmp, /dev/shm and runs/ are volumes."),
        (
            "startupProbe",
            0,
            "Same check as liveness; allows for the Ray start (RAY_START_TIMEOUT) and torchrun's start-up "
            "before liveness counts.",
        ),
        (
            "livenessProbe",
            0,
            "Alive = this pod's torchrun agent and its node-local Ray raylet both run (a /proc scan: no "
            "Python, no network, milliseconds). It catches a Ray runtime that died under a live torchrun, "
            "whose ranks would wait on their input stream. A hung collective (processes alive, no progress) "
            "is not its job: the process group's timeout raises in the ranks, torchrun exits and the pod "
            "fails.",
        ),
        (
            "volumes",
            0,
            "config: the ConfigMap. data: the dataset PVC, read-only at <workdir>/data so the configs' "
            "relative data/... paths work; runs: run dirs, graphs, checkpoints at <workdir>/runs. All pods "
            "mount both: ReadOnlyMany/ReadWriteMany storage. tmp: /tmp (Ray's temp dir, logs, spilled "
            "objects; HOME). shm: memory-backed /dev/shm for Ray's object store and NCCL. "
            "checkpoint-key (with --checkpoint-key-secret): the Secret holding the checkpoint-signing key, "
            "read-only.",
        ),
    ],
}


def _with_notes(text: str, notes: list[tuple[str, int, str]]) -> str:
    pending = {(key, n): note for key, n, note in notes}
    seen: dict[str, int] = {}
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\s*)(?:- )?([A-Za-z][\w.\-/]*):", line)
        if m:
            key = m.group(2)
            n = seen.get(key, 0)
            seen[key] = n + 1
            note = pending.pop((key, n), None)
            if note:
                indent = m.group(1)
                out += [f"{indent}# {c}" for c in textwrap.wrap(note, width=100 - len(indent))]
        out.append(line)
    if pending:
        raise ValueError(f"manifest notes for keys that were not rendered: {sorted(pending)}")
    return "\n".join(out) + "\n"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded config) as literal blocks, so the ConfigMap stays readable."""


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)

FILE_NAMES = {
    "ConfigMap": "00-configmap.yaml",
    "NetworkPolicy": "01-networkpolicy.yaml",
    "Service": "02-service.yaml",
    "Job": "03-job.yaml",
}


def manifest_files(job: K8sJob, objects: list[dict[str, Any]], command_line: str) -> dict[str, str]:
    """File name -> YAML text with a header naming the command that rendered it, and the notes."""
    shape = f"{job.gpus_per_node} GPU(s)" if job.gpus_per_node > 0 else f"{job.cpu_ranks} CPU rank(s), no GPU"
    files = {}
    for obj in objects:
        body = yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)
        kind = obj["kind"]
        notes = [n for n in _NOTES[kind] if n[0] != "tolerations" or job.gpus_per_node > 0]
        if kind != "ConfigMap":
            body = _with_notes(body, notes)
        else:  # never annotate inside the embedded config
            head, _, rest = body.partition("\ndata:")
            body = _with_notes(head + "\n", notes) + "data:" + rest
        header = (
            f"# cstwa-dist job {job.name!r}: {job.nodes} node(s) x {shape} - {kind}.\n"
            f"# Rendered by: {command_line}\n"
            "# Edit that command and render again rather than this file.\n"
        )
        files[FILE_NAMES[kind]] = header + body
    return files


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=RENDER_COMMAND,
        description="Render the Kubernetes manifests (ConfigMap, NetworkPolicy, headless Service, Indexed "
        "Job) for one "
        "cstwa-dist job on N nodes x G GPUs; --gpus-per-node 0 renders a CPU-only job. See k8s/README.md.",
    )
    add = p.add_argument
    add("--name", required=True, help="job name (DNS label); pods are <name>-<index>")
    add("--nodes", type=int, required=True, help="pods = nodes = NNODES")
    add(
        "--gpus-per-node",
        type=int,
        required=True,
        help="GPUs requested per pod = torchrun --nproc_per_node; 0 = CPU-only",
    )
    add("--cpu-ranks", type=int, default=2, help="ranks per pod when --gpus-per-node is 0 (default 2)")
    add("--image", required=True, help="image holding the repository at --workdir and its venv")
    add("--config", type=Path, required=True, help="run config YAML; goes into the ConfigMap")
    add(
        "--command",
        required=True,
        help='training command without --config, e.g. "train --model cstwa --set train.epochs=5"',
    )
    add("--data-pvc", required=True, help="PVC holding the datasets (read-only at <workdir>/data)")
    add("--runs-pvc", required=True, help="PVC for run dirs, graphs, checkpoints (<workdir>/runs)")
    add("--out", default="-", help="output folder, or - for stdout (default)")
    add("--namespace", default=None, help="namespace to set on every object (default: kubectl's)")
    add("--workdir", default="/opt/cstwa-dist", help="the repository inside the image")
    add("--venv", default=".venv", help="venv folder relative to --workdir (default .venv)")
    add("--port", type=int, default=29500, help="rendezvous port on pod 0 (default 29500)")
    add("--cpu", default=None, help="CPU request per pod (default: 4 per GPU or 1 per CPU rank, + Ray's)")
    add(
        "--memory",
        default=None,
        help="memory request = limit per pod (default: 32Gi per GPU or 4Gi per CPU rank)",
    )
    add("--shm-size", default=None, help="/dev/shm size (default: half of --memory)")
    add("--tmp-size", default="20Gi", help="/tmp size limit (default 20Gi)")
    add("--ray-cpus", type=int, default=None, help="RAY_NUM_CPUS (default: one per rank, at least 2)")
    add("--ray-start-timeout", type=int, default=120, help="RAY_START_TIMEOUT seconds (default 120)")
    add("--max-restarts", type=int, default=0, help="torchrun in-place restarts (c10d; default 0)")
    add(
        "--backoff-limit",
        type=int,
        default=None,
        help="pod failures before the Job fails (default 3 x --nodes: three whole-job failures; a "
        "retried train resumes from its newest checkpoint)",
    )
    add(
        "--ttl-after-finished",
        type=int,
        default=7 * 24 * 3600,
        metavar="SECONDS",
        help="delete the finished Job and its pods after this long (default 7 days)",
    )
    add(
        "--ephemeral-storage",
        default=None,
        help="local disk request = limit per pod (default: --tmp-size + 1Gi for logs)",
    )
    add(
        "--checkpoint-key-secret",
        default=None,
        metavar="NAME",
        help=f"existing Secret whose data key '{CHECKPOINT_KEY_ITEM}' is the checkpoint-signing key: "
        f"mounted read-only, its path in {CHECKPOINT_KEY_FILE_ENV}",
    )
    add("--uid", type=int, default=1000, help="non-root user id (default 1000)")
    add("--gid", type=int, default=1000, help="group id, also fsGroup (default 1000)")
    add("--node-selector", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    add("--image-pull-secret", default=None, help="name of an existing image pull Secret")
    return p


def job_from_args(args: argparse.Namespace) -> K8sJob:
    selector = []
    for item in args.node_selector:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--node-selector {item!r} must be KEY=VALUE")
        selector.append((key, value))
    return K8sJob(
        name=args.name,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        image=args.image,
        config=args.config,
        command=tuple(shlex.split(args.command)),
        data_pvc=args.data_pvc,
        runs_pvc=args.runs_pvc,
        cpu_ranks=args.cpu_ranks,
        namespace=args.namespace,
        workdir=args.workdir,
        venv=args.venv,
        port=args.port,
        cpu=args.cpu,
        memory=args.memory,
        shm_size=args.shm_size,
        tmp_size=args.tmp_size,
        ray_cpus=args.ray_cpus,
        ray_start_timeout=args.ray_start_timeout,
        max_restarts=args.max_restarts,
        backoff_limit=args.backoff_limit,
        ttl_after_finished=args.ttl_after_finished,
        ephemeral_storage=args.ephemeral_storage,
        checkpoint_key_secret=args.checkpoint_key_secret,
        uid=args.uid,
        gid=args.gid,
        node_selector=tuple(selector),
        image_pull_secret=args.image_pull_secret,
    )


def render_files(argv: list[str]) -> tuple[argparse.Namespace, K8sJob, dict[str, str]]:
    """The renderer's whole work for a command line: parse, check, build, annotate."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        job = job_from_args(args)
        objects = render(job)
    except ValueError as e:
        parser.error(str(e))
    return args, job, manifest_files(job, objects, f"{RENDER_COMMAND} {shlex.join(argv)}")


def main(argv: list[str] | None = None) -> int:
    from cstwa_dist.fs import atomic_write_text

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args, job, files = render_files(sys.argv[1:] if argv is None else argv)
    if args.out == "-":
        sys.stdout.write("---\n".join(files.values()))
        return 0
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic_write_text(folder / name, text)
        logger.info("wrote %s", folder / name)
    logger.info(
        "%d node(s) x %d rank(s): kubectl apply -f %s (see k8s/README.md)", job.nodes, job.nproc, folder
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
