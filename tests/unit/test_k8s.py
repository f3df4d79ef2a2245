"""The Kubernetes manifests (cstwa_dist/deploy/k8s.py, k8s/): schema-valid offline, wired for rendezvous,
fenced off by their NetworkPolicy, and resumable (a retried pod continues the run from its checkpoint).

No cluster is needed: every object is validated against the Kubernetes JSON schemas bundled in the
kubernetes-validate package (strict: unknown fields fail, as with kubectl's server-side validation) with
the network switched off, and the rendezvous is checked by computing what each pod of the Indexed Job
sees (its hostname, its completion index, its environment) the way the Job controller and the kubelet
fill them in.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cstwa_dist.deploy import k8s
from cstwa_dist.deploy.k8s import GPU_RESOURCE, INDEX_ANNOTATION, K8sJob, render

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "k8s" / "examples"
CASES = [(1, 0), (2, 8), (4, 8)]
# The oldest Kubernetes the manifests claim (podReplacementPolicy is on by default from 1.29) and the
# newest the validator bundles.
K8S_VERSIONS = ["1.29", "latest"]


def _job(nodes: int, gpus: int, **kw: Any) -> K8sJob:
    args: dict[str, Any] = dict(
        name="retrain",
        nodes=nodes,
        gpus_per_node=gpus,
        image="registry.example.com/cstwa-dist:0.1.0",
        config=ROOT / "configs" / "aliccp.yaml",
        command=("train", "--model", "cstwa"),
        data_pvc="data",
        runs_pvc="runs",
    )
    return K8sJob(**(args | kw))


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [o["kind"] for o in objects]
    assert sorted(kinds) == ["ConfigMap", "Job", "NetworkPolicy", "Service"], kinds
    return {o["kind"]: o for o in objects}


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}x{g}gpu" for n, g in CASES])
def case(request) -> tuple[K8sJob, dict[str, dict[str, Any]]]:
    job = _job(*request.param)
    return job, _by_kind(render(job))


def _pod_spec(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return objs["Job"]["spec"]["template"]["spec"]


def _container(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (c,) = _pod_spec(objs)["containers"]
    return c


def _pod_view(job_obj: dict[str, Any], index: int) -> tuple[str, dict[str, str]]:
    """Pod ``index`` of the Indexed Job as the cluster makes it: hostname ``<job>-<index>``, the
    completion-index annotation, and the container's env with fieldRefs and $(VAR) references resolved."""
    name = job_obj["metadata"]["name"]
    annotations = {INDEX_ANNOTATION: str(index)}
    env: dict[str, str] = {}
    (container,) = job_obj["spec"]["template"]["spec"]["containers"]
    for var in container["env"]:
        if "value" in var:
            value = var["value"]
            for k, v in env.items():  # kubelet expands $(VAR) from variables defined earlier
                value = value.replace(f"$({k})", v)
            env[var["name"]] = value
        elif var["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP":
            env[var["name"]] = f"10.0.0.{index + 10}"  # each pod its own address
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            prefix = "metadata.annotations['"
            assert path.startswith(prefix) and path.endswith("']"), path
            env[var["name"]] = annotations[path[len(prefix) : -2]]
    return f"{name}-{index}", env


# --- schema validation, offline ---------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails: the schemas must come from the installed package."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during offline validation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(case, version, no_network):
    from kubernetes_validate import utils

    v = utils.latest_version() if version == "latest" else version
    _, objs = case
    for obj in objs.values():
        assert utils.validate(obj, v, strict=True)


def test_the_validator_catches_a_misspelt_nested_field(no_network):
    """Strict schemas: a typo deep in the pod spec fails, so the test above is not vacuous."""
    from kubernetes_validate import utils

    objs = _by_kind(render(_job(2, 8)))
    _container(objs)["securityContext"]["readOnlyRootFs"] = True
    with pytest.raises(utils.ValidationError, match="readOnlyRootFs"):
        utils.validate(objs["Job"], "1.29", strict=True)


# --- rendezvous wiring --------------------------------------------------------------------------------


def test_every_pod_sees_the_same_endpoint_and_ranks_agree(case):
    job, objs = case
    spec = objs["Job"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == job.nodes
    views = [_pod_view(objs["Job"], i) for i in range(spec["completions"])]
    hostnames = [h for h, _ in views]
    envs = [e for _, e in views]
    assert {e["NNODES"] for e in envs} == {str(job.nodes)}
    assert [int(e["NODE_RANK"]) for e in envs] == list(range(job.nodes))
    for key in ("MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT", "JOB_ID"):
        assert len({e[key] for e in envs}) == 1, f"pods disagree on {key}"
    env0 = envs[0]
    assert env0["RDZV_ENDPOINT"] == f"{env0['MASTER_ADDR']}:{env0['MASTER_PORT']}"
    # the endpoint is pod 0 (NODE_RANK 0, which hosts the store) through the headless Service
    pod_spec = _pod_spec(objs)
    assert env0["MASTER_ADDR"] == f"{hostnames[0]}.{pod_spec['subdomain']}"
    # every pod binds its stores to its own pod IP, never to all interfaces
    for i, e in enumerate(envs):
        assert e["RDZV_BIND_ADDR"] == e["LOCAL_ADDR"] == e["POD_IP"] == f"10.0.0.{i + 10}"


def test_the_headless_service_makes_pod_zero_resolvable(case):
    job, objs = case
    svc, pod_spec = objs["Service"], _pod_spec(objs)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    # <pod hostname>.<subdomain> resolves only when subdomain names a headless Service selecting the pod
    assert pod_spec["subdomain"] == svc["metadata"]["name"]
    assert pod_spec.get("setHostnameAsFQDN", False) is False
    assert "hostname" not in pod_spec  # the Indexed Job sets <job>-<index> itself
    pod_labels = objs["Job"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc.get("metadata", {}).get("namespace") == objs["Job"]["metadata"].get("namespace")
    (port,) = svc["spec"]["ports"]
    (container_port,) = _container(objs)["ports"]
    _, env = _pod_view(objs["Job"], 0)
    assert port["port"] == port["targetPort"] == container_port["containerPort"] == int(env["MASTER_PORT"])
    for index in range(job.nodes):  # every hostname is a valid DNS label
        host, _ = _pod_view(objs["Job"], index)
        assert len(host) <= 63 and len(f"{host}.{pod_spec['subdomain']}") <= 253


def test_nproc_matches_the_gpu_request(case):
    job, objs = case
    c = _container(objs)
    assert c["command"] == ["bash", "launchers/torchrun.sh"]
    nproc = int(c["args"][0])
    limits = c["resources"]["limits"]
    if job.gpus_per_node:
        assert nproc == int(limits[GPU_RESOURCE]) == job.gpus_per_node
        assert _pod_spec(objs)["tolerations"][0]["key"] == GPU_RESOURCE
    else:
        assert nproc == job.cpu_ranks
        assert GPU_RESOURCE not in yaml.safe_dump(objs["Job"])
    assert c["args"][1:4] == ["train", "--model", "cstwa"]


# --- the NetworkPolicy ----------------------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector as the API server reads it; the renderer only uses matchLabels."""
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


def _admits(
    policy: dict[str, Any],
    *,
    src: dict[str, str],
    dst: dict[str, str],
    port: int,
    protocol: str = "TCP",
    same_namespace: bool = True,
) -> bool:
    """Whether ``policy`` lets a pod labelled ``src`` connect to a pod labelled ``dst`` on ``port``, by
    the NetworkPolicy rules: a pod the policy selects for Ingress takes only what some rule allows; a
    peer with a bare podSelector is a pod of the policy's own namespace; rule ports list allowed ones
    (a port without a number: every port of that protocol)."""
    spec = policy["spec"]
    if not _selects(spec["podSelector"], dst) or "Ingress" not in spec["policyTypes"]:
        return True  # not isolated by this policy
    for rule in spec.get("ingress", []):
        peers = rule.get("from")
        peer_ok = peers is None or any(
            set(peer) == {"podSelector"} and same_namespace and _selects(peer["podSelector"], src)
            for peer in peers
        )
        ports = rule.get("ports")
        port_ok = ports is None or any(
            p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports
        )
        if peer_ok and port_ok:
            return True
    return False


def test_the_network_policy_admits_only_the_jobs_own_pods(case):
    job, objs = case
    policy = objs["NetworkPolicy"]
    pods = objs["Job"]["spec"]["template"]["metadata"]["labels"]
    assert policy["metadata"].get("namespace") == objs["Job"]["metadata"].get("namespace")
    assert _selects(policy["spec"]["podSelector"], pods)  # it fences this job's pods in
    _, env = _pod_view(objs["Job"], 0)
    rdzv = int(env["MASTER_PORT"])
    for port in (rdzv, 45678, 6379):  # the rendezvous store, an ephemeral gloo/NCCL port, any other
        assert _admits(policy, src=pods, dst=pods, port=port)
        assert not _admits(policy, src=pods, dst=pods, port=port, same_namespace=False)
    other_job = pods | {"app.kubernetes.io/instance": "someone-else"}
    for src in (other_job, {}, {"app": "web"}):
        assert not _admits(policy, src=src, dst=pods, port=rdzv)
    assert not _admits(policy, src=pods, dst=pods, port=rdzv, protocol="UDP")
    # nothing in the rules opens it wider: no ipBlock, no namespaceSelector
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert peers and all(set(peer) == {"podSelector"} for peer in peers)


def test_the_network_policy_is_applied_before_the_pods_exist():
    names = list(k8s.FILE_NAMES.values())
    assert names == sorted(names)  # kubectl apply -f DIR goes in file-name order
    assert names.index(k8s.FILE_NAMES["NetworkPolicy"]) < names.index(k8s.FILE_NAMES["Job"])


# --- retries, resume, cleanup, local disk ------------------------------------------------------------------


def test_train_is_rendered_with_resume_auto_and_retries(case):
    job, objs = case
    spec, c = objs["Job"]["spec"], _container(objs)
    args = c["args"]
    assert args[args.index("--resume") + 1] == "auto"
    assert args.index("--resume") < args.index("--config")
    assert spec["backoffLimit"] == 3 * job.nodes > 0
    assert spec["podReplacementPolicy"] == "Failed"  # required with a podFailurePolicy
    (rule,) = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "Ignore"
    assert rule["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    # checkpoints land under the run dir, on the runs volume (the renderer refuses anything else)
    runs = next(m for m in c["volumeMounts"] if m["name"] == "runs")
    assert runs["mountPath"] == f"{job.workdir}/runs" and not runs.get("readOnly")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (("train", "--model", "cstwa", "--resume", "never"), "never"),
        (("train", "--model", "cstwa", "--resume", "runs/aliccp/cstwa/checkpoints/step-10"), None),
        (("train", "--model", "cstwa", "--set", "train.resume=never"), None),
        (("pretrain",), None),
    ],
)
def test_an_explicit_resume_choice_is_kept(command, expected):
    """--resume auto is added only where the command and config leave it open: an explicit choice wins,
    and `--resume auto` after a `--set train.resume=...` would silently override it."""
    args = _container(_by_kind(render(_job(2, 8, command=command))))["args"]
    assert args[1:-2] == list(command)
    assert args.count("--resume") == command.count("--resume")
    if expected:
        assert args[args.index("--resume") + 1] == expected


def test_ttl_and_ephemeral_storage(case):
    job, objs = case
    c, volumes = _container(objs), {v["name"]: v for v in _pod_spec(objs)["volumes"]}
    assert objs["Job"]["spec"]["ttlSecondsAfterFinished"] == 7 * 24 * 3600
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert requests["ephemeral-storage"] == limits["ephemeral-storage"]
    disk = k8s.quantity_bytes(limits["ephemeral-storage"])
    assert disk > k8s.quantity_bytes(volumes["tmp"]["emptyDir"]["sizeLimit"])  # /tmp fits, plus logs


def test_sizes_and_retries_follow_the_options():
    objs = _by_kind(
        render(
            _job(2, 8, backoff_limit=1, ttl_after_finished=3600, ephemeral_storage="50Gi", tmp_size="40Gi")
        )
    )
    assert objs["Job"]["spec"]["backoffLimit"] == 1
    assert objs["Job"]["spec"]["ttlSecondsAfterFinished"] == 3600
    assert _container(objs)["resources"]["limits"]["ephemeral-storage"] == "50Gi"


def test_ray_stays_on_loopback(case):
    """Each pod's ranks attach to their own pod's Ray runtime, and only on loopback (RAY_NODE_IP unset)
    does Ray bind its ports to one address rather than every interface (launchers/ray_runtime.sh)."""
    job, objs = case
    for index in range(job.nodes):
        assert "RAY_NODE_IP" not in _pod_view(objs["Job"], index)[1]


def test_checkpoint_key_secret_is_mounted_read_only_as_a_file(no_network):
    from kubernetes_validate import utils

    objs = _by_kind(render(_job(2, 8, checkpoint_key_secret="retrain-ckpt-key")))
    c, volumes = _container(objs), {v["name"]: v for v in _pod_spec(objs)["volumes"]}
    secret = volumes["checkpoint-key"]["secret"]
    assert secret["secretName"] == "retrain-ckpt-key"
    (item,) = secret["items"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "checkpoint-key")
    assert mount["readOnly"] is True
    _, env = _pod_view(objs["Job"], 0)
    assert env[k8s.CHECKPOINT_KEY_FILE_ENV] == f"{mount['mountPath']}/{item['path']}"
    assert "retrain-ckpt-key" not in yaml.safe_dump(objs["ConfigMap"])
    for obj in objs.values():
        assert utils.validate(obj, "1.29", strict=True)
    plain = _by_kind(render(_job(2, 8)))
    assert k8s.CHECKPOINT_KEY_FILE_ENV not in _pod_view(plain["Job"], 0)[1]
    assert "checkpoint-key" not in {v["name"] for v in _pod_spec(plain)["volumes"]}


# --- config, volumes, security -------------------------------------------------------------------------


def test_config_map_is_mounted_and_passed_as_config(case):
    job, objs = case
    cm, c, pod_spec = objs["ConfigMap"], _container(objs), _pod_spec(objs)
    assert cm["immutable"] is True
    assert cm["data"] == {"aliccp.yaml": (ROOT / "configs" / "aliccp.yaml").read_text()}
    args = c["args"]
    config_path = args[args.index("--config") + 1]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    (item,) = volumes["config"]["configMap"]["items"]
    assert config_path == f"{mounts['config']['mountPath']}/{item['path']}" and item["key"] in cm["data"]
    assert mounts["config"]["readOnly"] is True


def test_no_secret_in_the_config_map(case):
    _, objs = case
    cm = objs["ConfigMap"]
    assert "binaryData" not in cm
    for text in cm["data"].values():
        assert not k8s._secret_keys(yaml.safe_load(text))


def test_the_renderer_refuses_credential_like_keys(tmp_path):
    cfg = tmp_path / "leaky.yaml"
    cfg.write_text((ROOT / "configs" / "aliccp.yaml").read_text() + "storage:\n  api_token: abc\n")
    with pytest.raises(ValueError, match=r"storage\.api_token.*Secret"):
        render(_job(2, 8, config=cfg))


def test_volumes_data_runs_tmp_and_shm(case):
    job, objs = case
    c, pod_spec = _container(objs), _pod_spec(objs)
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "data", "readOnly": True}
    assert mounts["data"]["readOnly"] is True and mounts["data"]["mountPath"] == f"{job.workdir}/data"
    assert volumes["runs"]["persistentVolumeClaim"] == {"claimName": "runs"}
    assert mounts["runs"]["mountPath"] == f"{job.workdir}/runs" and not mounts["runs"].get("readOnly")
    assert mounts["tmp"]["mountPath"] == "/tmp" and "emptyDir" in volumes["tmp"]
    assert mounts["shm"]["mountPath"] == "/dev/shm" and volumes["shm"]["emptyDir"]["medium"] == "Memory"
    shm = k8s.quantity_bytes(volumes["shm"]["emptyDir"]["sizeLimit"])
    assert shm < k8s.quantity_bytes(c["resources"]["limits"]["memory"])
    kinds = {next(k for k in v if k != "name") for v in pod_spec["volumes"]}
    assert kinds <= {"configMap", "persistentVolumeClaim", "emptyDir"}  # restricted-profile volume types


def test_security_context_is_restricted(case):
    _, objs = case
    pod_spec, c = _pod_spec(objs), _container(objs)
    psc, csc = pod_spec["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc["runAsNonRoot"] is True and csc["runAsUser"] > 0
    assert csc["allowPrivilegeEscalation"] is False and csc["privileged"] is False
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_spec["automountServiceAccountToken"] is False
    assert not any(k in pod_spec for k in ("hostNetwork", "hostPID", "hostIPC"))
    _, env = _pod_view(objs["Job"], 0)
    assert env["HOME"].startswith("/tmp")  # writable with a read-only root filesystem


def test_probes_are_the_process_check(case):
    _, objs = case
    c = _container(objs)
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"] == ["bash", "-c", k8s.LIVENESS_SCRIPT]
    startup = c["startupProbe"]
    _, env = _pod_view(objs["Job"], 0)
    assert startup["periodSeconds"] * startup["failureThreshold"] > int(env["RAY_START_TIMEOUT"])


def _run_probe(proc_root: Path) -> int:
    script = k8s.LIVENESS_SCRIPT.replace("/proc/", f"{proc_root}/")
    return subprocess.run(["bash", "-c", script], cwd=proc_root).returncode


def _fake_proc(root: Path, cmdlines: list[list[str]]) -> Path:
    for pid, argv in enumerate(cmdlines, start=100):
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return root


def test_liveness_script_needs_torchrun_and_the_raylet_and_never_matches_itself(tmp_path):
    torchrun = ["/opt/cstwa-dist/.venv/bin/python3", "/opt/cstwa-dist/.venv/bin/torchrun", "--nnodes=2"]
    raylet = ["/opt/cstwa-dist/.venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--x"]
    probe_itself = ["bash", "-c", k8s.LIVENESS_SCRIPT]  # /proc lists the probe's own process too
    assert _run_probe(_fake_proc(tmp_path / "both", [probe_itself, torchrun, raylet])) == 0
    assert _run_probe(_fake_proc(tmp_path / "no-ray", [probe_itself, torchrun])) != 0
    assert _run_probe(_fake_proc(tmp_path / "no-torchrun", [probe_itself, raylet])) != 0
    assert _run_probe(_fake_proc(tmp_path / "idle", [probe_itself])) != 0


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_liveness_script_on_real_processes():
    procs = [
        subprocess.Popen(["bash", "-c", f"exec -a {name} sleep 30"])
        for name in ("/venv/bin/torchrun", "/ray/core/src/ray/raylet/raylet")
    ]
    try:
        for p, name in zip(procs, ("/venv/bin/torchrun", "/ray/core/src/ray/raylet/raylet"), strict=True):
            cmdline = Path(f"/proc/{p.pid}/cmdline")
            deadline = time.monotonic() + 10
            while not cmdline.read_bytes().startswith(name.encode()):  # until the exec has happened
                assert time.monotonic() < deadline, "exec -a did not happen"
                time.sleep(0.01)
        assert subprocess.run(["bash", "-c", k8s.LIVENESS_SCRIPT]).returncode == 0
    finally:
        for p in procs:
            p.kill()
            p.wait()


# --- render-time checks and the command ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(command=("synth", "--preset", "demo")), "takes --config"),
        (dict(command=("train", "--model", "no_such_model")), "not a cstwa-dist command"),
        (dict(command=("train", "--model", "cstwa", "--config", "x.yaml")), "must not contain --config"),
        (dict(command=("train", "--model", "cstwa", "--set", "train.epoch=3")), "unknown key"),
        (dict(command=("train", "--model", "cstwa", "--set", "train.run_dir=/scratch/x")), "runs volume"),
        (dict(command=("train", "--model", "cstwa", "--run-dir", "out/x")), "runs volume"),
        (dict(command=("train", "--model", "cstwa", "--set", "data.dataset=../x")), "could not read"),
        (
            dict(command=("train", "--model", "cstwa", "--set", "train.checkpoint_dir=/scratch/ckpt")),
            r"train\.checkpoint_dir = '/scratch/ckpt'.*outside the runs volume",
        ),
        (
            dict(command=("train", "--model", "cstwa", "--set", "train.checkpoint_dir=data/ckpt")),
            r"train\.checkpoint_dir.*outside the runs volume",
        ),
        (dict(command=("train", "--model", "cstwa", "--resume", "/scratch/step-10")), r"--resume.*could not"),
        (
            dict(command=("train", "--model", "cstwa", "--set", "train.resume=../old/step-10")),
            r"train\.resume.*could not read",
        ),
        (dict(ephemeral_storage="10Gi"), "at least --tmp-size"),
        (dict(backoff_limit=-1), ">= 0"),
        (dict(checkpoint_key_secret="Bad_Name"), "not a Secret name"),
        (dict(memory="8Gi", shm_size="8Gi"), "below --memory"),
        (dict(name="Retrain"), "DNS label"),
        (dict(name="r" * 60), "too long"),
        (dict(gpus_per_node=-1), ">= 0"),
        (dict(cpu_ranks=0), ">= 1"),
        (dict(venv="/opt/venv"), "relative"),
        (dict(uid=0), "non-root"),
    ],
)
def test_render_refuses_what_would_fail_on_the_cluster(change, message):
    """What the cluster would reject, or the job would fail on only after N pods were scheduled."""
    with pytest.raises(ValueError, match=message):
        render(_job(2, 8, **change))


def test_cpu_only_rendering_uses_cpu_ranks():
    objs = _by_kind(render(_job(3, 0, cpu_ranks=4, namespace="ml")))
    c = _container(objs)
    assert c["args"][0] == "4"
    assert "tolerations" not in _pod_spec(objs)
    assert {o["metadata"]["namespace"] for o in objs.values()} == {"ml"}


def test_cli_writes_four_manifests_or_one_stream(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = [
        "--name",
        "smoke",
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--image",
        "img:1",
        "--config",
        "configs/demo.yaml",
        "--data-pvc",
        "data",
        "--runs-pvc",
        "runs",
        "--command",
        "train --model esmm --set train.epochs=1",
    ]
    assert k8s.main([*argv, "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(k8s.FILE_NAMES.values())
    from_files = [yaml.safe_load((tmp_path / n).read_text()) for n in k8s.FILE_NAMES.values()]
    capsys.readouterr()
    assert k8s.main(argv) == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == from_files
    with pytest.raises(SystemExit):
        k8s.main([*argv[:-1], "train --model esmm --set train.nope=1"])


def test_the_launcher_is_one_command_and_imports_no_torch_or_ray(tmp_path):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['render_k8s.py', '--name', 'x', '--nodes', '2', '--gpus-per-node', '8', '--image', 'i',"
        f" '--config', 'configs/aliccp.yaml', '--data-pvc', 'd', '--runs-pvc', 'r', '--command', 'pretrain',"
        f" '--out', {str(tmp_path)!r}]\n"
        "try:\n"
        "    runpy.run_path('launchers/render_k8s.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in ('torch', 'torchrec', 'ray', 'fbgemm_gpu', 'faiss') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)
    assert len(list(tmp_path.glob("*.yaml"))) == len(k8s.FILE_NAMES)


# --- the committed examples ------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", sorted(p for p in EXAMPLES.iterdir() if p.is_dir()), ids=lambda p: p.name)
def test_committed_examples_are_what_their_command_renders(folder, monkeypatch):
    """k8s/examples/* must stay in step with the renderer: each file names the command that made it."""
    monkeypatch.chdir(ROOT)
    files = {p.name: p.read_text() for p in sorted(folder.glob("*.yaml"))}
    assert sorted(files) == sorted(k8s.FILE_NAMES.values())
    prefix = f"# Rendered by: {k8s.RENDER_COMMAND} "
    (line,) = {ln for text in files.values() for ln in text.splitlines() if ln.startswith(prefix)}
    _, _, fresh = k8s.render_files(shlex.split(line[len(prefix) :]))
    hint = f"re-render with: {line[len('# Rendered by: ') :]}"
    for name, text in files.items():
        committed, rendered = yaml.safe_load(text), yaml.safe_load(fresh[name])
        if committed["kind"] == "ConfigMap":  # the config file itself may change; its key and wiring not
            assert committed["data"].keys() == rendered["data"].keys(), hint
            committed["data"] = rendered["data"] = {}
        else:
            assert text == fresh[name], hint
        assert committed == rendered, hint
