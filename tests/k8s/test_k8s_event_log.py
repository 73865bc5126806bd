"""The event log in Kubernetes: a 3-server NATS JetStream StatefulSet (claims, PDB, probes on
the monitoring port, NetworkPolicy), the profile-worker Deployment, and the settings that
tie the gateway and the workers to it (same URL, same pseudonym key, replicas per overlay)."""

from __future__ import annotations

import re

from k8s_helpers import Rendered, containers, env_values
from test_k8s_networkpolicy import allowed, pods


def nats_conf(overlay: Rendered) -> str:
    return str(overlay.get("ConfigMap", "nats-config")["data"]["nats.conf"])


def test_nats_is_a_three_server_jetstream_cluster_on_claims(overlay: Rendered) -> None:
    nats = overlay.get("StatefulSet", "nats")
    spec = nats["spec"]
    assert spec["replicas"] == 3, "a Raft quorum that survives one server down"
    (claim,) = spec["volumeClaimTemplates"]
    (c,) = containers(spec["template"])
    data = next(m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    conf = nats_conf(overlay)
    store = re.search(r"store_dir:\s*(\S+)", conf)
    assert store and store.group(1).startswith(data["mountPath"]), "JetStream off the claim"
    routes = re.findall(r"nats://(nats-\d)\.nats-headless:6222", conf)
    assert sorted(routes) == [f"nats-{i}" for i in range(3)]
    headless = overlay.get("Service", "nats-headless")["spec"]
    assert headless["clusterIP"] == "None" and spec["serviceName"] == "nats-headless"
    assert headless.get("publishNotReadyAddresses"), "routes must resolve before readiness"
    pdb = overlay.get("PodDisruptionBudget", "nats")["spec"]
    assert pdb["maxUnavailable"] == 1


def test_nats_probes_use_the_monitoring_port(overlay: Rendered) -> None:
    (c,) = containers(overlay.get("StatefulSet", "nats")["spec"]["template"])
    monitor = next(p for p in c["ports"] if p["name"] == "monitor")
    assert re.search(rf"http:\s*0\.0\.0\.0:{monitor['containerPort']}", nats_conf(overlay))
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = c[kind]["httpGet"]
        assert probe["port"] == "monitor" and probe["path"].startswith("/healthz"), kind
    # Liveness must not restart a server that is only catching up with its peers.
    assert "js-enabled-only" in c["livenessProbe"]["httpGet"]["path"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_only_gateway_and_workers_reach_nats(overlay: Rendered) -> None:
    p = pods(overlay)
    for source in ("gateway", "profile-worker"):
        assert allowed(overlay, p[source], p["nats"], 4222), source
    assert allowed(overlay, p["nats"], p["nats"], 6222), "cluster routes"
    for stranger in ("stranger-same-ns", "stranger-other-ns", "ray-head"):
        for port in (4222, 6222, 8222):
            assert not allowed(overlay, p[stranger], p["nats"], port), (stranger, port)
    assert allowed(overlay, p["prometheus"], p["nats"], 8222)
    assert allowed(overlay, p["profile-worker"], p["triton"], 8001)
    assert allowed(overlay, p["profile-worker"], p["milvus"], 19530)


def test_gateway_and_workers_share_the_log_settings(
    overlay: Rendered, settings_cls, monkeypatch
) -> None:
    from test_k8s_consistency import settings_from_env

    gateway = overlay.workload("gateway")
    worker = overlay.workload("profile-worker")
    assert gateway["kind"] == "Deployment", "the gateway keeps no state: a Deployment"
    assert "volumeClaimTemplates" not in gateway["spec"]
    (gc,) = containers(gateway["spec"]["template"])
    (wc,) = containers(worker["spec"]["template"])
    assert wc["command"] == ["python", "-m", "services.profile_worker"]
    assert wc["image"] == gc["image"]
    g = settings_from_env(settings_cls, env_values(overlay, gc), monkeypatch)
    w = settings_from_env(settings_cls, env_values(overlay, wc), monkeypatch)
    assert g.nats_urls == w.nats_urls == "nats://nats:4222"
    assert overlay.get("Service", "nats")["spec"]["ports"][0]["port"] == 4222
    for name in ("events_stream", "tombstone_bucket", "profile_consumer", "duplicate_window_s"):
        assert getattr(g, name) == getattr(w, name), name
    # Subjects are keyed hashes of user ids: both must read the same Secret key.
    refs = [
        {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env", [])}
        for c in (gc, wc)
    ]
    assert refs[0]["RECSYS_PSEUDONYM_KEY"] == refs[1]["RECSYS_PSEUDONYM_KEY"] is not None
    expected = 3 if overlay.name.startswith("prod") else 1
    assert g.stream_replicas == expected, f"{overlay.name}: streams with {g.stream_replicas}"
    metrics = next(p for p in wc["ports"] if p["name"] == "metrics")
    assert metrics["containerPort"] == w.worker_metrics_port
    wsec = worker["spec"]["template"]["spec"]["securityContext"]
    assert wsec["runAsNonRoot"] and wc["securityContext"]["readOnlyRootFilesystem"]
