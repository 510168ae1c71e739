"""deploy/: every manifest parses and agrees with the code (no cluster is reachable here).

Checks container args against ``kvbm serve``'s real argument parser and service options, probes
against the path the HTTP endpoint serves, ports against the Service and the container, volumes
against their mounts, the vLLM connector's extra config against ``ConnectorConfig``, and every
metric the Grafana dashboard queries against the exporters' names.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from kvbm.cli import build_parser  # noqa: E402
from kvbm.config import KvbmConfig, parse_size  # noqa: E402
from kvbm.integrations.vllm.config import ConnectorConfig  # noqa: E402
from kvbm.metrics import METRIC_NAMES  # noqa: E402
from kvbm.service import HEALTH_PATH, METRICS_PATH, SERVE_METRIC_NAMES  # noqa: E402

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def _kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}"
    return found[0]


def _port(container: dict, ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    return next(p["containerPort"] for p in container["ports"] if p["name"] == ref)


def _mount_of(container: dict, path: str) -> dict:
    mounts = [m for m in container["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is on no volume mount of {container['name']}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def test_every_manifest_parses() -> None:
    files = sorted((DEPLOY / "k8s").glob("*.yaml"))
    assert files
    for f in files:
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                assert {"apiVersion", "kind", "metadata"} <= set(d), f.name


def test_kvbm_serve_statefulset_matches_the_code() -> None:
    docs = _docs("kvbm-serve.yaml")
    sts = _kind(docs, "StatefulSet", "kvbm-serve")
    svc = _kind(docs, "Service", "kvbm-serve")
    secret = _kind(docs, "Secret", "kvbm-serve-tokens")
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    # The args are what `kvbm serve` parses (same parser), and valid service options.
    args = build_parser().parse_args(c["args"])
    assert args.command == "serve"
    from kvbm.service import ServiceOptions

    ServiceOptions(http_host=args.http_host, http_port=args.http_port, disk_path=args.disk_path,
                   disk_capacity_bytes=parse_size(args.disk_capacity, "--disk-capacity")).validate()
    # Ports: container ports are the ones kvbm serve binds; the Service targets them by name.
    assert _port(c, "kvbm") == args.port and _port(c, "http") == args.http_port
    for sp in svc["spec"]["ports"]:
        assert sp["targetPort"] in [p["name"] for p in c["ports"]]
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    # Probes: the real health endpoint on the HTTP port.
    for probe in ("readinessProbe", "livenessProbe"):
        g = c[probe]["httpGet"]
        assert g["path"] == HEALTH_PATH and _port(c, g["port"]) == args.http_port
    ann = sts["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/path"] == METRICS_PATH and int(ann["prometheus.io/port"]) == args.http_port
    # The disk tier lives on the PersistentVolumeClaim, large enough for its capacity.
    m = _mount_of(c, args.disk_path)
    (claim,) = [t for t in sts["spec"]["volumeClaimTemplates"] if t["metadata"]["name"] == m["name"]]
    assert parse_size(claim["spec"]["resources"]["requests"]["storage"].replace("Gi", "GiB"), "storage") >= \
        parse_size(args.disk_capacity, "--disk-capacity")
    # The token file comes from the Secret.
    tm = _mount_of(c, args.token_file)
    vol = next(v for v in pod["volumes"] if v["name"] == tm["name"])
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    item = vol["secret"]["items"][0]
    assert item["key"] in secret["stringData"]
    assert tm["mountPath"] + "/" + item["path"] == args.token_file
    # SIGTERM drain fits in the grace period.
    assert pod["terminationGracePeriodSeconds"] > args.drain_timeout


def _kv_transfer_config(c: dict) -> dict:
    arg = next(a for a in c["args"] if a.startswith("--kv-transfer-config="))
    return json.loads(arg.split("=", 1)[1])


def test_vllm_deployment_configures_the_connector() -> None:
    docs = _docs("vllm.yaml")
    dep = _kind(docs, "Deployment", "vllm-kvbm")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    ktc = _kv_transfer_config(c)
    assert ktc["kv_connector"] == "KvbmConnector" and ktc["kv_connector_module_path"] == "kvbm.integrations.vllm"
    assert ktc["kv_load_failure_policy"] == "recompute"
    cfg = ConnectorConfig.from_extra_config(ktc["kv_connector_extra_config"], ktc["kv_role"])  # every key accepted
    m = _mount_of(c, cfg.disk_path)
    vol = next(v for v in pod["volumes"] if v["name"] == m["name"])
    assert "hostPath" in vol or "persistentVolumeClaim" in vol  # local NVMe on the node
    port = int(next(a for a in c["args"] if a.startswith("--port=")).split("=")[1])
    assert _port(c, c["readinessProbe"]["httpGet"]["port"]) == port
    svc = _kind(docs, "Service", "vllm-kvbm")
    assert svc["spec"]["ports"][0]["targetPort"] in [p["name"] for p in c["ports"]]
    # The BlockManager client configuration is a valid KvbmConfig pointing at the kvbm serve Service.
    cm = _kind(docs, "ConfigMap", "kvbm-client-config")
    kc = KvbmConfig.from_dict(yaml.safe_load(cm["data"]["kvbm.yaml"]))
    serve = _kind(_docs("kvbm-serve.yaml"), "Service", "kvbm-serve")
    host, _, port_s = kc.remote_url.removeprefix("kvbm://").partition(":")
    assert host.split(".")[1] == serve["metadata"]["name"]
    assert int(port_s) in [p["port"] for p in serve["spec"]["ports"]]


def test_dockerfiles_install_this_repository() -> None:
    for name in ("Dockerfile", "Dockerfile.vllm"):
        text = (DEPLOY / name).read_text()
        assert re.search(r"^COPY \. ", text, re.M), name
        assert "pip install" in text or "pip wheel" in text
    text = (DEPLOY / "Dockerfile").read_text()
    sts = _kind(_docs("kvbm-serve.yaml"), "StatefulSet", "kvbm-serve")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    exposed = {int(p) for line in text.splitlines() if line.startswith("EXPOSE") for p in line.split()[1:]}
    assert {p["containerPort"] for p in c["ports"]} <= exposed
    cmd = json.loads(text.split("CMD", 1)[1].strip().splitlines()[0])
    assert build_parser().parse_args(cmd).command == "serve"
    assert shlex.split(" ".join(cmd))  # well-formed


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "kvbm.json").read_text())
    known = set(METRIC_NAMES) | set(SERVE_METRIC_NAMES)
    try:
        from kvbm.integrations.vllm.stats import METRIC_NAMES as CONNECTOR_NAMES

        known |= set(CONNECTOR_NAMES)
    except ImportError:
        pytest.skip("vllm is not installed: the connector's metric names cannot be imported")
    queried: set[str] = set()
    for panel in dash["panels"]:
        for t in panel["targets"]:
            queried |= set(re.findall(r"\b(kvbm_[a-z_]+)\b", t["expr"]))
    assert queried
    missing = sorted(queried - known)
    assert not missing, f"the dashboard queries metrics no exporter writes: {missing}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("hit ratio", "bytes/s", "evictions", "checksum", "load latency", "queue"):
        assert topic in titles
