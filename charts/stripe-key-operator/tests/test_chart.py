"""Tests of the stripe-key-operator Helm chart, run by `make test` after `cargo test`.

They lint the chart with Helm's own linter (helm-python-sdk, Helm v4 SDK), render it with the
defaults and every values file in tests/values/, validate each rendered object with
kubernetes-validate --strict for Kubernetes 1.29 and the newest version it knows, read the
RBAC objects to prove least privilege, and prove that values.schema.json refuses bad values
(check-jsonschema and Helm's own schema validation).

Every tool is imported or looked up at module level: a missing tool fails the run, it never
skips a test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm  # a missing package fails collection, loudly
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parent.parent
REPO = CHART.parent.parent
VALUES_DIR = CHART / "tests" / "values"
BAD_VALUES_DIR = CHART / "tests" / "bad-values"
RELEASE = "sko"
NAMESPACE = "stripe-key-operator"
FULLNAME = f"{RELEASE}-stripe-key-operator"

# check-jsonschema and kubernetes-validate are console scripts next to this interpreter (the
# venv of .ci/install-tools.sh); fall back to PATH, and fail when neither has them.
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    local = BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run `bash .ci/install-tools.sh` (or `make tools`)")
    return found


OLDEST_K8S = "1.29.0"
NEWEST_K8S = kubernetes_validate.utils.latest_version()
K8S_VERSIONS = [OLDEST_K8S, NEWEST_K8S]

# Kinds without an upstream schema in kubernetes-validate: skipped explicitly, by name.
NO_UPSTREAM_SCHEMA = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    # validated against tests/alerts/prometheusrule.schema.json and by promtool instead
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
}

VALUE_SETS: dict[str, Path | None] = {"defaults": None}
VALUE_SETS.update({p.stem: p for p in sorted(VALUES_DIR.glob("*.yaml"))})
BAD_VALUES = sorted(BAD_VALUES_DIR.glob("*.yaml"))

REQUIRED_VALUE_SETS = {
    "namespaced",
    "vault-kubernetes-auth",
    "kubernetes-store",
    "servicemonitor",
    "monitoring",
}


def load_values(name: str) -> dict | None:
    path = VALUE_SETS[name]
    return yaml.safe_load(path.read_text()) if path else None


# The two facts about a site the chart cannot default without allowing any address: where the
# API server is (Helm looks it up at install, but not when rendering here) and Stripe's API
# addresses. Every render below gets them under its own values; the tests of the
# NetworkPolicy show what happens without them.
API_SERVER_CIDRS = ["10.96.0.1/32", "172.18.0.2/32"]
STRIPE_CIDRS = ["3.18.12.63/32", "54.187.174.169/32"]
SITE = {
    "networkPolicy": {
        "egress": {
            "kubernetesApi": {"cidrs": API_SERVER_CIDRS},
            "stripe": {"cidrs": STRIPE_CIDRS},
        }
    }
}


def merged(base: dict, over: dict | None) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def with_site(values: dict | None) -> dict:
    return merged(SITE, values)


def render_raw(values: dict | None) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict | None) -> dict[str, str]:
    return render_raw(with_site(values))


def objects_of(manifests: dict[str, str]) -> list[dict]:
    out = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


_RENDERED: dict[str, list[dict]] = {}


def rendered(name: str) -> list[dict]:
    if name not in _RENDERED:
        _RENDERED[name] = objects_of(render(load_values(name)))
    return _RENDERED[name]


def notes(name: str) -> str:
    return render(load_values(name))[f"{CHART.name}/templates/NOTES.txt"]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(objs: list[dict]) -> dict:
    return one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(objs: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in container(objs).get("env", [])}


# ---------------------------------------------------------------------------------------------
# Lint, render, Kubernetes schemas
# ---------------------------------------------------------------------------------------------


def test_the_required_value_sets_exist():
    assert REQUIRED_VALUE_SETS <= set(VALUE_SETS), sorted(VALUE_SETS)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_strict_helm_lint_reports_no_warning(name, version):
    report = helm.lint(
        str(CHART), with_site(load_values(name)), strict=True, namespace=NAMESPACE, kube_version=f"v{version}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_objects_pass_kubernetes_validate_strict(name, tmp_path):
    objs = rendered(name)
    assert objs, "the chart rendered nothing"
    known = [o for o in objs if (o["apiVersion"], o["kind"]) not in NO_UPSTREAM_SCHEMA]
    skipped = [o for o in objs if (o["apiVersion"], o["kind"]) in NO_UPSTREAM_SCHEMA]
    if skipped:
        print(f"skipped (no upstream schema): {[o['kind'] for o in skipped]}")
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump_all(known))
    args = [tool("kubernetes-validate"), "--strict"]
    for v in K8S_VERSIONS:
        args += ["-k", v]
    proc = subprocess.run([*args, str(manifest)], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # kubernetes-validate only warns (exit 0) when it has no schema for a kind: any WARN means
    # an object was not validated, which this test does not accept for upstream kinds.
    assert "WARN" not in out and "ERROR" not in out, out
    passed = [line for line in out.splitlines() if line.startswith("INFO") and " passed " in line]
    assert len(passed) == len(known) * len(K8S_VERSIONS), out


def test_kubernetes_validate_rejects_an_unknown_field():
    """The validator used above is strict: it refuses a field Kubernetes does not know."""
    deployment = json.loads(json.dumps(one(rendered("defaults"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_K8S, strict=True)


def test_chart_crds_are_byte_identical_to_the_generated_crds():
    assert (CHART / "crds" / "stripekeys.io.yaml").read_bytes() == (
        REPO / "crds" / "stripekeys.io.yaml"
    ).read_bytes(), "copy crds/stripekeys.io.yaml into charts/stripe-key-operator/crds/"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_chart_crds_pass_kubernetes_validate_strict(version):
    crds = [d for d in yaml.safe_load_all((CHART / "crds" / "stripekeys.io.yaml").read_text()) if d]
    assert {c["spec"]["names"]["kind"] for c in crds} == {
        "StripeAccount",
        "StripeGuardrail",
        "StripeKeyPolicy",
        "StripeWebhookEndpoint",
    }
    for crd in crds:
        kubernetes_validate.validate(crd, version, strict=True)


# ---------------------------------------------------------------------------------------------
# The Deployment
# ---------------------------------------------------------------------------------------------


def test_deployment_runs_two_hardened_replicas_with_probes():
    objs = rendered("defaults")
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(objs)
    assert dep["spec"]["replicas"] == 2
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["args"] == ["run"]
    env = env_of(objs)
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["LEADER_ELECT"]["value"] == "true"
    assert env["WATCH_NAMESPACES"]["value"] == ""
    assert env["MAX_CONCURRENT_RECONCILES"]["value"] == "16"
    assert env["MAX_IN_FLIGHT_PER_ACCOUNT"]["value"] == "4"
    assert env["CIRCUIT_BREAKER_FAILURES"]["value"] == "5"
    assert env["CIRCUIT_BREAKER_COOLDOWN"]["value"] == "30s"
    assert env["CIRCUIT_BREAKER_MAX_COOLDOWN"]["value"] == "5m"
    assert env["ORPHAN_SWEEP_INTERVAL"]["value"] == "5m"
    assert env["MALLOC_ARENA_MAX"]["value"] == "1"
    assert env["MALLOC_MMAP_THRESHOLD_"]["value"] == "131072"


def test_image_tag_defaults_to_app_version_and_a_digest_wins():
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert container(rendered("defaults"))["image"].endswith(f":{app_version}")
    pinned = container(rendered("webhook-and-scheduling"))["image"]
    assert re.fullmatch(r"registry\.example\.com/sko@sha256:[0-9a-f]{64}", pinned), pinned


def run_config_env_vars() -> set[str]:
    """Every `env = "..."` of `RunConfig` in src/controller/mod.rs: the flags of `run`."""
    src = (REPO / "src" / "controller" / "mod.rs").read_text()
    body = src[src.index("pub struct RunConfig") :]
    body = body[: body.index("\n}\n")]
    names = set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', body))
    assert len(names) >= 15, f"could not parse RunConfig: {names}"
    return names


def test_every_run_flag_is_reachable_from_values():
    seen: set[str] = set()
    for name in VALUE_SETS:
        seen |= set(env_of(rendered(name)))
    missing = run_config_env_vars() - seen
    assert not missing, f"flags of `run` that no values set reaches: {sorted(missing)}"


def test_vault_values_reach_the_operator():
    objs = rendered("vault-kubernetes-auth")
    env = {k: v.get("value") for k, v in env_of(objs).items()}
    assert env["VAULT_ADDR"] == "https://vault.example.internal:8200"
    assert env["VAULT_AUTH"] == "kubernetes"
    assert env["VAULT_AUTH_MOUNT"] == "k8s-prod"
    assert env["VAULT_ROLE"] == "stripe-key-operator-prod"
    assert env["VAULT_MOUNT"] == "kv" and env["VAULT_PREFIX"] == "payments/stripe"
    assert env["LOG_FORMAT"] == "text" and env["RUST_LOG"] == "debug,kube=info"
    assert env["HTTP_ADDR"] == "0.0.0.0:9090"
    assert env["LEASE_NAME"] == "sko-leader"
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["vault-ca"]["configMap"] == {"name": "vault-ca", "items": [{"key": "ca.pem", "path": "ca.crt"}]}
    assert env["VAULT_CACERT"] == f"{mounts['vault-ca']}/ca.crt"
    token = volumes["vault-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token == {"audience": "vault", "expirationSeconds": 1800, "path": "token"}
    assert env["VAULT_K8S_TOKEN_FILE"] == f"{mounts['vault-token']}/token"


def test_approle_secret_id_is_a_file_and_the_token_never_a_literal():
    approle = rendered("vault-approle")
    env = env_of(approle)
    pod = one(approle, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["vault-approle"]["secret"]["secretName"] == "vault-approle"
    assert env["VAULT_SECRET_ID_FILE"]["value"] == f"{mounts['vault-approle']}/secret-id"
    assert volumes["vault-ca"]["secret"]["secretName"] == "vault-tls"
    token = env_of(rendered("vault-token"))["VAULT_TOKEN"]
    assert "value" not in token
    assert token["valueFrom"] == {"secretKeyRef": {"name": "vault-dev-token", "key": "token"}}


def test_embedded_stores_drop_every_vault_setting():
    for name in ("kubernetes-store", "memory-sandbox"):
        env = env_of(rendered(name))
        assert env["STORE"]["value"] == name.split("-")[0]
        assert not [k for k in env if k.startswith("VAULT_")], name
        policy = one(rendered(name), "NetworkPolicy")
        ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
        assert 8200 not in ports, "no Vault egress without Vault"


def test_memory_store_is_refused_without_sandbox_and_warned_with_it():
    with pytest.raises(helm.HelmError, match="sandbox"):
        render({"store": "memory"})
    assert "WARNING: store: memory" in notes("memory-sandbox")
    assert "WARNING" not in notes("defaults")


def test_template_checks_refuse_unsafe_combinations():
    with pytest.raises(helm.HelmError, match="leader election"):
        render({"leaderElection": {"enabled": False}})
    with pytest.raises(helm.HelmError, match="secretIdSecret"):
        render({"vault": {"auth": {"method": "approle"}}})
    with pytest.raises(helm.HelmError, match="not both"):
        render({"vault": {"caCert": {"configMap": {"name": "a"}, "secret": {"name": "b"}}}})


def test_labels_and_annotations_reach_every_object_and_the_pods():
    objs = rendered("servicemonitor")
    for o in objs:
        meta = o["metadata"]
        assert meta["labels"]["team"] == "payments", o["kind"]
        assert meta.get("annotations", {}).get("owner") == "payments-platform", o["kind"]
    template = one(objs, "Deployment")["spec"]["template"]["metadata"]
    assert template["labels"]["sidecar.istio.io/inject"] == "false"
    assert template["annotations"]["example.com/scrape"] == "true"
    assert template["annotations"]["owner"] == "payments-platform"


def test_scheduling_values_reach_the_pod():
    pod = one(rendered("webhook-and-scheduling"), "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["affinity"] and "podAntiAffinity" not in pod["affinity"]
    spread = pod["topologySpreadConstraints"][0]
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    default_pod = one(rendered("defaults"), "Deployment")["spec"]["template"]["spec"]
    assert "podAntiAffinity" in default_pod["affinity"], "replicas spread over nodes by default"


def test_servicemonitor_scrapes_the_metrics_service_port():
    objs = rendered("servicemonitor")
    sm = one(objs, "ServiceMonitor")
    svc = one(objs, "Service", f"{FULLNAME}-metrics")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["interval"] == "15s" and endpoint["scrapeTimeout"] == "5s"
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert not [o for o in rendered("defaults") if o["kind"] == "ServiceMonitor"]


def test_one_or_two_replicas_elect_a_leader_and_three_share_the_work_through_shards():
    defaults = {k: v.get("value") for k, v in env_of(rendered("defaults")).items()}
    assert defaults["SHARDS"] == "1", "two replicas: one leader, one standby"
    fullname = one(rendered("defaults"), "Deployment")["metadata"]["name"]
    assert defaults["SHARD_LEASE_PREFIX"] == fullname
    objs = rendered("sharded")
    assert one(objs, "Deployment")["spec"]["replicas"] == 3
    env = {k: v.get("value") for k, v in env_of(objs).items()}
    assert env["SHARDS"] == "3", "sharding.shards defaults to replicaCount"
    assert env["SHARD_LEASE_PREFIX"] == fullname
    assert env["LEADER_ELECT"] == "true"
    assert (env["LEASE_DURATION"], env["RENEW_DEADLINE"], env["RETRY_PERIOD"]) == ("15s", "10s", "2s")
    for i in range(3):
        assert granted(objs, "coordination.k8s.io", "leases", "update", NAMESPACE, f"{fullname}-shard-{i}")
    assert granted(objs, "coordination.k8s.io", "leases", "list", NAMESPACE)
    # One replica out at a time: its shards move to the others within a lease duration.
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    # An explicit count wins, in both directions.
    six = objects_of(render({"replicaCount": 3, "sharding": {"shards": 6}}))
    assert env_of(six)["SHARDS"]["value"] == "6"
    single = objects_of(render({"replicaCount": 3, "sharding": {"shards": 1}}))
    assert env_of(single)["SHARDS"]["value"] == "1"
    assert not granted(single, "coordination.k8s.io", "leases", "list", NAMESPACE)
    two = objects_of(render({"replicaCount": 2, "sharding": {"shards": 4}}))
    assert env_of(two)["SHARDS"]["value"] == "4"


def test_sharding_without_leases_is_refused():
    with pytest.raises(Exception, match="sharding needs Leases"):
        render({"replicaCount": 1, "leaderElection": {"enabled": False}, "sharding": {"shards": 3}})
    render({"replicaCount": 1, "leaderElection": {"enabled": False}})


def test_pod_disruption_budget_never_blocks_on_an_unhealthy_replica():
    pdb = one(rendered("defaults"), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    labels = one(rendered("defaults"), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())


# ---------------------------------------------------------------------------------------------
# NetworkPolicy
# ---------------------------------------------------------------------------------------------


def test_network_policy_admits_only_the_metrics_and_webhook_ports():
    default = one(rendered("defaults"), "NetworkPolicy")["spec"]
    assert default["policyTypes"] == ["Ingress", "Egress"]
    ingress_ports = [p["port"] for rule in default["ingress"] for p in rule["ports"]]
    assert ingress_ports == ["http-metrics"]
    webhook = one(rendered("webhook-and-scheduling"), "NetworkPolicy")["spec"]
    ingress_ports = sorted(p["port"] for rule in webhook["ingress"] for p in rule["ports"])
    assert ingress_ports == ["http-metrics", "https-webhook"]
    metrics_rule = webhook["ingress"][0]
    assert metrics_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    container_ports = {p["name"] for p in container(rendered("webhook-and-scheduling"))["ports"]}
    assert set(ingress_ports) <= container_ports


def egress_peers(egress: list[dict], port: int) -> list[dict]:
    return [peer for rule in egress if any(p["port"] == port for p in rule["ports"]) for peer in rule.get("to", [])]


def test_network_policy_egress_is_dns_api_vault_and_stripe_only():
    egress = one(rendered("defaults"), "NetworkPolicy")["spec"]["egress"]
    ports = sorted({(p["port"], p["protocol"]) for rule in egress for p in rule["ports"]})
    assert ports == [(53, "TCP"), (53, "UDP"), (443, "TCP"), (6443, "TCP"), (8200, "TCP")]
    # Every rule names its peers: no port is open to any address.
    for rule in egress:
        assert rule.get("to"), f"egress to any address on {rule['ports']}"
        for peer in rule["to"]:
            assert peer.get("ipBlock", {}).get("cidr") not in {"0.0.0.0/0", "::/0"}, rule
    dns = egress_peers(egress, 53)
    assert dns == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    vault = egress_peers(egress, 8200)
    assert vault == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vault"}}}]
    api = [r for r in egress if {p["port"] for p in r["ports"]} == {443, 6443}]
    assert len(api) == 1 and [p["ipBlock"]["cidr"] for p in api[0]["to"]] == API_SERVER_CIDRS
    stripe = [r for r in egress if {p["port"] for p in r["ports"]} == {443}]
    assert len(stripe) == 1 and [p["ipBlock"]["cidr"] for p in stripe[0]["to"]] == STRIPE_CIDRS
    custom = one(rendered("webhook-and-scheduling"), "NetworkPolicy")["spec"]["egress"]
    cidrs = [peer["ipBlock"]["cidr"] for r in custom for peer in r.get("to", []) if "ipBlock" in peer]
    assert "10.0.0.1/32" in cidrs and "10.1.2.3/32" in cidrs
    assert "10.96.0.1/32" not in cidrs, "values replace the API server addresses"


def test_network_policy_defaults_allow_no_address_they_do_not_know():
    """Without the site's addresses the chart refuses to render instead of opening a port to
    every address; the error says what to set."""
    with pytest.raises(helm.HelmError, match=r"kubernetesApi\.cidrs is empty"):
        render_raw(None)
    only_api = {"networkPolicy": {"egress": {"kubernetesApi": {"cidrs": API_SERVER_CIDRS}}}}
    with pytest.raises(helm.HelmError, match=r"stripe\.cidrs is empty.*ips_api\.txt"):
        render_raw(only_api)
    with pytest.raises(helm.HelmError, match=r"vault\.to is empty"):
        render({"networkPolicy": {"egress": {"vault": {"to": []}}}})
    # Without a NetworkPolicy nothing is needed; without Stripe egress no Stripe address is.
    assert not [o for o in objects_of(render_raw({"networkPolicy": {"enabled": False}})) if o["kind"] == "NetworkPolicy"]
    no_stripe = merged(only_api, {"networkPolicy": {"egress": {"stripe": {"enabled": False}}}})
    egress = one(objects_of(render_raw(no_stripe)), "NetworkPolicy")["spec"]["egress"]
    assert not [r for r in egress if {p["port"] for p in r["ports"]} == {443}]


def test_any_public_address_for_stripe_is_explicit_and_excludes_internal_ranges():
    values = merged(
        {"networkPolicy": {"egress": {"kubernetesApi": {"cidrs": API_SERVER_CIDRS}}}},
        {"networkPolicy": {"egress": {"stripe": {"anyPublicAddress": True}}}},
    )
    egress = one(objects_of(render_raw(values)), "NetworkPolicy")["spec"]["egress"]
    stripe = [r for r in egress if {p["port"] for p in r["ports"]} == {443}]
    assert len(stripe) == 1
    block = stripe[0]["to"][0]["ipBlock"]
    assert block["cidr"] == "0.0.0.0/0"
    for private in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8", "100.64.0.0/10"):
        assert private in block["except"], private
    # Listed addresses win over the switch.
    both = merged(values, {"networkPolicy": {"egress": {"stripe": {"cidrs": STRIPE_CIDRS}}}})
    egress = one(objects_of(render_raw(both)), "NetworkPolicy")["spec"]["egress"]
    stripe = [r for r in egress if {p["port"] for p in r["ports"]} == {443}]
    assert [p["ipBlock"]["cidr"] for p in stripe[0]["to"]] == STRIPE_CIDRS


def test_readme_says_what_the_egress_defaults_are():
    readme = (CHART / "README.md").read_text()
    section = readme[readme.index("## Network policy") :]
    section = section[: section.index("\n## ", 1)]
    for needed in ("ips_api.txt", "anyPublicAddress", "kubernetesApi.cidrs", "helm template", "EndpointSlice"):
        assert needed in section, needed
    assert "any address" not in readme.replace("never any address", ""), "the README promises no open port"


# ---------------------------------------------------------------------------------------------
# RBAC
# ---------------------------------------------------------------------------------------------

RBAC_KINDS = {"ClusterRole", "Role"}
SECRET_WRITE = {"create", "patch", "update", "delete"}


def roles(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in RBAC_KINDS]


def bound_roles(objs: list[dict]) -> list[dict]:
    """Roles bound to the operator's ServiceAccount (binding and role checked together)."""
    sa = one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    out = []
    for b in (o for o in objs if o["kind"] in {"ClusterRoleBinding", "RoleBinding"}):
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
        ref = b["roleRef"]
        role = one(
            [r for r in roles(objs) if r["metadata"].get("namespace") == b["metadata"].get("namespace")],
            ref["kind"],
            ref["name"],
        )
        out.append(role)
    assert len(out) == len(roles(objs)), "every role is bound, once"
    return out


def allows(role: dict, group: str, resource: str, verb: str, name: str | None = None) -> bool:
    for rule in role["rules"]:
        if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
            names = rule.get("resourceNames")
            if not names or (name is not None and name in names):
                return True
    return False


def granted(objs: list[dict], group: str, resource: str, verb: str, namespace: str | None, name: str | None = None) -> bool:
    """Whether the operator may `verb` `resource` in `namespace` (None: cluster-wide)."""
    for role in bound_roles(objs):
        if role["kind"] == "ClusterRole" or role["metadata"]["namespace"] == namespace:
            if allows(role, group, resource, verb, name):
                return True
    return False


# What the operator does, per scope (from the controllers, the store, the leader elector).
# tests/rbac_coverage.rs proves these against a recording API server, both ways; these tables
# keep the chart's shape readable and fail fast without a Rust build.
NAMESPACED_KIND_RULES = [
    ("stripekeys.io", "stripekeypolicies", ["get", "list", "watch", "patch"]),
    ("stripekeys.io", "stripewebhookendpoints", ["get", "list", "watch", "patch"]),
    ("stripekeys.io", "stripekeypolicies/status", ["patch"]),
    ("stripekeys.io", "stripewebhookendpoints/status", ["patch"]),
    ("", "secrets", ["get", "list", "watch", "create", "patch"]),
    ("apps", "deployments", ["get", "list", "patch"]),
    ("apps", "statefulsets", ["get", "list", "patch"]),
    ("apps", "daemonsets", ["get", "list", "patch"]),
    ("events.k8s.io", "events", ["create", "patch"]),
]
# Never used by the operator: granting them would be a grant nothing needs.
NAMESPACED_KIND_UNUSED = [
    ("stripekeys.io", "stripekeypolicies", ["update", "delete", "create"]),
    ("stripekeys.io", "stripekeypolicies/status", ["get", "update"]),
    ("stripekeys.io", "stripekeypolicies/finalizers", ["update"]),
    ("stripekeys.io", "stripewebhookendpoints/finalizers", ["update"]),
    ("", "secrets", ["update", "delete", "deletecollection"]),
    ("apps", "deployments", ["watch", "update", "delete"]),
    ("", "events", ["create", "patch"]),
]
CLUSTER_RULES = [
    # patch: the account controller's finalizer (stripekeys.io/account-protection).
    ("stripekeys.io", "stripeaccounts", ["get", "list", "watch", "patch"]),
    ("stripekeys.io", "stripeaccounts/status", ["patch"]),
    ("stripekeys.io", "stripeguardrails", ["list", "watch"]),
    # Watched, labels read from that cache (get: only the admission webhook, off here).
    ("", "namespaces", ["list", "watch"]),
]
CLUSTER_UNUSED = [
    ("stripekeys.io", "stripeaccounts/status", ["get", "update"]),
    ("stripekeys.io", "stripeaccounts", ["update", "delete", "create"]),
    ("stripekeys.io", "stripeguardrails/status", ["get", "patch", "update"]),
    ("stripekeys.io", "stripeguardrails", ["get"]),
    ("", "namespaces", ["get", "create", "update", "patch", "delete"]),
]
# The operator's own Secrets in the release namespace, by store (webhook off).
SELF_SECRET_VERBS = {
    "vault": {"get"},
    "kubernetes": {"get", "create", "update", "delete"},
}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_no_rbac_rule_uses_a_wildcard(name):
    for role in roles(rendered(name)):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                values = rule.get(field, [])
                assert not [v for v in values if "*" in v], f"{role['metadata']['name']}: {field} {values}"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_leases_are_granted_only_in_a_role_in_the_release_namespace(name):
    objs = rendered(name)
    lease_roles = [r for r in roles(objs) if any("leases" in rule["resources"] for rule in r["rules"])]
    assert len(lease_roles) == 1
    role = lease_roles[0]
    assert role["kind"] == "Role" and role["metadata"]["namespace"] == NAMESPACE
    lease = env_of(objs)["LEASE_NAME"]["value"]
    sharded = int(env_of(objs)["SHARDS"]["value"]) > 1
    for rule in (r for r in role["rules"] if "leases" in r["resources"]):
        assert rule["apiGroups"] == ["coordination.k8s.io"]
        if sharded and "resourceNames" not in rule and rule["verbs"] != ["create"]:
            # Shard and membership Leases (named after pods): in the release namespace only.
            assert set(rule["verbs"]) == {"get", "list", "update", "delete"}, rule
        elif set(rule["verbs"]) - {"create"}:
            assert rule["resourceNames"] == [lease], "get/update only on the operator's own Lease"
    for verb in ("get", "create", "update"):
        assert granted(objs, "coordination.k8s.io", "leases", verb, NAMESPACE, lease)
    assert (
        granted(objs, "coordination.k8s.io", "leases", "update", NAMESPACE, "someone-elses-lease") == sharded
    ), "other Leases of the release namespace only when sharding"
    assert not granted(objs, "coordination.k8s.io", "leases", "get", "payments", lease)
    assert not granted(objs, "coordination.k8s.io", "leases", "update", "payments", "sko-shard-0")


def test_cluster_mode_grants_what_the_operator_needs_everywhere():
    objs = rendered("defaults")
    assert env_of(objs)["WATCH_NAMESPACES"]["value"] == ""
    for group, resource, verbs in NAMESPACED_KIND_RULES + CLUSTER_RULES:
        for verb in verbs:
            assert granted(objs, group, resource, verb, None), (group, resource, verb)
    for group, resource, verbs in NAMESPACED_KIND_UNUSED + CLUSTER_UNUSED:
        for verb in verbs:
            assert not granted(objs, group, resource, verb, "payments"), (group, resource, verb)
    assert not granted(objs, "", "configmaps", "get", None)
    assert not granted(objs, "", "pods", "list", None)
    assert not granted(objs, "stripekeys.io", "stripeaccounts", "delete", None)
    assert not granted(objs, "apps", "deployments", "delete", None)


def test_cluster_mode_writes_secrets_everywhere_only_by_apply_and_replaces_or_deletes_only_its_own():
    """Issue 14: cluster mode granted create/update/delete on every Secret, kube-system
    included. Synced Secrets are applied (patch, create on first apply) and removed by the
    garbage collector; update and delete exist only where the operator keeps its own."""
    for name in ("defaults", "kubernetes-store", "webhook-and-scheduling"):
        objs = rendered(name)
        for verb in ("update", "delete", "deletecollection"):
            assert not granted(objs, "", "secrets", verb, "kube-system", "anything"), (name, verb)
            assert not granted(objs, "", "secrets", verb, "payments", "anything"), (name, verb)
    kube = rendered("kubernetes-store")
    for verb in ("update", "delete"):
        assert granted(kube, "", "secrets", verb, NAMESPACE, "sko-bundle"), verb
    vault = rendered("defaults")
    for verb in ("update", "delete"):
        assert not granted(vault, "", "secrets", verb, NAMESPACE, "anything"), verb
    webhook = rendered("webhook-and-scheduling")
    tls = f"{FULLNAME}-webhook-tls"
    assert granted(webhook, "", "secrets", "update", NAMESPACE, tls)
    assert not granted(webhook, "", "secrets", "update", NAMESPACE, "another-secret")


def test_namespaced_mode_confines_the_operator_to_its_namespaces():
    objs = rendered("namespaced")
    watched = load_values("namespaced")["watchNamespaces"]
    assert env_of(objs)["WATCH_NAMESPACES"]["value"] == ",".join(watched)
    assert env_of(objs)["MAX_CONCURRENT_RECONCILES"]["value"] == "4"
    for ns in watched:
        for group, resource, verbs in NAMESPACED_KIND_RULES:
            for verb in verbs:
                assert granted(objs, group, resource, verb, ns), (ns, group, resource, verb)
        for group, resource, verbs in NAMESPACED_KIND_UNUSED:
            for verb in verbs:
                assert not granted(objs, group, resource, verb, ns), (ns, group, resource, verb)
    store = (load_values("namespaced") or {}).get("store", "vault")
    self_verbs = {
        v for v in ("get", "list", "watch", "create", "patch", "update", "delete")
        if granted(objs, "", "secrets", v, NAMESPACE, "x")
    }
    assert self_verbs == SELF_SECRET_VERBS[store], self_verbs
    assert not granted(objs, "events.k8s.io", "events", "create", NAMESPACE), "no Event is written there"
    for group, resource, verbs in CLUSTER_RULES:
        for verb in verbs:
            assert granted(objs, group, resource, verb, "anywhere"), (group, resource, verb)
    # Outside the listed namespaces: nothing namespaced, above all no Secret.
    for verb in ("get", "list", "create", "update", "delete"):
        assert not granted(objs, "", "secrets", verb, "kube-system"), verb
    assert not granted(objs, "stripekeys.io", "stripekeypolicies", "list", "kube-system")
    assert not granted(objs, "apps", "deployments", "patch", "kube-system")
    role_namespaces = {r["metadata"]["namespace"] for r in roles(objs) if r["kind"] == "Role"}
    # `default`: Events about StripeAccounts (cluster-scoped objects' Events are written there),
    # and nothing else.
    assert role_namespaces == {*watched, NAMESPACE, "default"}
    assert granted(objs, "events.k8s.io", "events", "create", "default")
    assert not granted(objs, "", "secrets", "get", "default")
    assert not granted(objs, "stripekeys.io", "stripekeypolicies", "list", "default")


@pytest.mark.parametrize("name", ["namespaced"])
def test_namespaced_mode_renders_no_cluster_role_beyond_the_cluster_scoped_kinds(name):
    cluster_roles = [r for r in roles(rendered(name)) if r["kind"] == "ClusterRole"]
    assert [r["metadata"]["name"] for r in cluster_roles] == [f"{FULLNAME}-cluster-scoped"]
    resources = {res for rule in cluster_roles[0]["rules"] for res in rule["resources"]}
    assert resources == {
        "stripeaccounts",
        "stripeaccounts/status",
        "stripeguardrails",
        "namespaces",
        "customresourcedefinitions",
    }
    for rule in cluster_roles[0]["rules"]:
        if rule["resources"] == ["namespaces"]:
            # Watched (labels only matter), read one at a time only by the admission webhook
            # (off here); never written.
            assert rule["verbs"] == ["list", "watch"]
        if rule["resources"] == ["customresourcedefinitions"]:
            assert rule["verbs"] == ["get"]
            assert len(rule["resourceNames"]) == 4


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_secret_writes_only_where_the_operator_keeps_secrets(name):
    objs = rendered(name)
    values = load_values(name) or {}
    namespaced = values.get("rbac", {}).get("namespaced", False)
    for role in roles(objs):
        writes = {v for rule in role["rules"] if "secrets" in rule["resources"] for v in rule["verbs"]} & SECRET_WRITE
        if not writes:
            continue
        if namespaced:
            assert role["kind"] == "Role", "namespaced mode: no cluster-wide Secret access"
            assert role["metadata"]["namespace"] in {*values["watchNamespaces"], NAMESPACE}
        elif role["kind"] == "ClusterRole":
            # Cluster mode: synced Secrets live in any tenant namespace, written by apply.
            assert role["metadata"]["name"] == FULLNAME
            assert writes == {"create", "patch"}, writes
        else:
            # Replacing and deleting only the operator's own Secrets, in its namespace.
            assert role["metadata"]["namespace"] == NAMESPACE, role["metadata"]
            assert writes <= {"update", "delete"}, writes


def test_webhook_configuration_is_patchable_only_by_its_own_name():
    objs = rendered("webhook-and-scheduling")
    vwc = one(objs, "ValidatingWebhookConfiguration")
    name = vwc["metadata"]["name"]
    for verb in ("get", "patch"):
        assert granted(objs, "admissionregistration.k8s.io", "validatingwebhookconfigurations", verb, None, name)
    assert not granted(objs, "admissionregistration.k8s.io", "validatingwebhookconfigurations", "update", None, name)
    assert not granted(objs, "admissionregistration.k8s.io", "validatingwebhookconfigurations", "patch", None, "other")
    assert not granted(objs, "admissionregistration.k8s.io", "validatingwebhookconfigurations", "list", None)
    svc = vwc["webhooks"][0]["clientConfig"]["service"]
    assert one(objs, "Service", svc["name"])["spec"]["ports"][0]["port"] == svc["port"]
    for name in ("defaults", "namespaced", "webhook-cert-manager"):
        assert not any(
            "validatingwebhookconfigurations" in rule["resources"] for r in roles(rendered(name)) for rule in r["rules"]
        ), "no webhook permission when the webhook is off or cert-manager injects the CA"


# ---------------------------------------------------------------------------------------------
# Admission webhooks
# ---------------------------------------------------------------------------------------------

OPERATOR_SRC = (REPO / "src" / "admission" / "mod.rs").read_text()


def webhooks_of(name: str) -> dict[str, dict]:
    vwc = one(rendered(name), "ValidatingWebhookConfiguration")
    return {w["name"]: w for w in vwc["webhooks"]}


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (an absent selector matches everything)."""
    if not selector:
        return True
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def ns_labels(name: str, **extra: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name, **extra}


MATCH_CONDITION = re.compile(r"^request\.userInfo\.username != '([^']+)'$")


def conditions_match(webhook: dict, username: str) -> bool:
    """The webhook's matchConditions for a request by `username`. Only the one shape the chart
    renders is understood; anything else fails the test instead of being guessed at."""
    for c in webhook.get("matchConditions", []):
        m = MATCH_CONDITION.match(c["expression"])
        assert m, f"unexpected matchCondition {c}"
        if username == m.group(1):
            return False
    return True


def reaches(
    webhook: dict,
    group: str,
    resource: str,
    namespace: dict[str, str],
    obj: dict[str, str],
    username: str = "alice",
) -> bool:
    """Whether the API server would call `webhook` for a CREATE of `resource` in `namespace`
    by `username`."""
    ruled = any(
        group in r["apiGroups"] and resource in r["resources"] and "CREATE" in r["operations"]
        for r in webhook["rules"]
    )
    return (
        ruled
        and selector_matches(webhook.get("namespaceSelector"), namespace)
        and selector_matches(webhook.get("objectSelector"), obj)
        and conditions_match(webhook, username)
    )


def test_webhook_paths_port_and_failure_policy_match_the_operator():
    hooks = webhooks_of("webhook-cert-manager")
    assert set(hooks) == {"stripekeys.validate.stripekeys.io", "no-literal-keys.validate.stripekeys.io"}
    paths = {h["clientConfig"]["service"]["path"] for h in hooks.values()}
    assert paths == {"/validate/stripekeys", "/validate/no-literal-keys"}
    for path in paths:
        assert f'"{path}"' in OPERATOR_SRC, f"the operator does not serve {path}"
    for h in hooks.values():
        assert h["failurePolicy"] == "Fail"
        assert h["sideEffects"] == "None" and h["admissionReviewVersions"] == ["v1"]
    objs = rendered("webhook-cert-manager")
    svc = one(objs, "Service", f"{FULLNAME}-webhook")
    assert svc["spec"]["ports"][0]["targetPort"] == "https-webhook"
    port = next(p for p in container(objs)["ports"] if p["name"] == "https-webhook")["containerPort"]
    assert env_of(objs)["WEBHOOK_ADDR"]["value"] == f"0.0.0.0:{port}"
    assert env_of(objs)["WEBHOOK_SERVICE"]["value"] == svc["metadata"]["name"]


def test_webhook_down_never_blocks_unrelated_namespaces_or_the_operator_itself():
    """With failurePolicy Fail, what the API server sends to the webhook is what an outage blocks."""
    for name in ("webhook-and-scheduling", "webhook-cert-manager"):
        hooks = webhooks_of(name)
        stripe = hooks["stripekeys.validate.stripekeys.io"]
        keys = hooks["no-literal-keys.validate.stripekeys.io"]
        unrelated = ns_labels("payments")
        opted_in = ns_labels("shop", **{"stripekeys.io/no-literal-keys": "enforce"})
        for hook in hooks.values():
            for group, resource in [("", "pods"), ("", "secrets"), ("", "configmaps"), ("apps", "deployments")]:
                assert not reaches(hook, group, resource, unrelated, {}), (name, hook["name"], resource)
            # Never kube-system or the operator's namespace, even when labelled.
            for ns in ("kube-system", NAMESPACE):
                labelled = ns_labels(ns, **{"stripekeys.io/no-literal-keys": "enforce"})
                for group, resource in [("", "pods"), ("", "secrets"), ("stripekeys.io", "stripekeypolicies")]:
                    assert not reaches(hook, group, resource, labelled, {}), (name, hook["name"], ns, resource)
        # What they do guard.
        assert reaches(stripe, "stripekeys.io", "stripekeypolicies", unrelated, {})
        assert reaches(keys, "", "pods", opted_in, {})
        assert reaches(keys, "", "secrets", opted_in, {"app": "api"})
        assert reaches(keys, "apps", "deployments", opted_in, {})
        # The operator's own writes are never sent to the literal-keys webhook: decided by who
        # asks, so an outage never blocks the Secrets it manages...
        operator = f"system:serviceaccount:{NAMESPACE}:{FULLNAME}"
        managed = {"app.kubernetes.io/managed-by": "stripe-key-operator"}
        assert not reaches(keys, "", "secrets", opted_in, managed, username=operator)
        assert not reaches(keys, "", "secrets", opted_in, {}, username=operator)
        # ...and never by a label: a tenant's labelled object is still judged.
        for group, resource in [("", "configmaps"), ("", "secrets"), ("apps", "deployments")]:
            assert reaches(keys, group, resource, opted_in, managed), (name, resource)
        # The opt-in label the chart uses is the one the operator names in its messages.
        assert keys["namespaceSelector"]["matchLabels"] == {"stripekeys.io/no-literal-keys": "enforce"}
        assert 'LITERAL_KEYS_LABEL: &str = "stripekeys.io/no-literal-keys"' in OPERATOR_SRC
        assert 'LITERAL_KEYS_ENFORCE: &str = "enforce"' in OPERATOR_SRC


def test_literal_keys_exemption_is_the_operators_identity_never_a_label():
    for name in ("webhook-and-scheduling", "webhook-cert-manager"):
        objs = rendered(name)
        keys = webhooks_of(name)["no-literal-keys.validate.stripekeys.io"]
        assert "objectSelector" not in keys, "no object selector: any tenant can set a label"
        pod = one(objs, "Deployment")["spec"]["template"]["spec"]
        sa = pod["serviceAccountName"]
        expected = f"request.userInfo.username != 'system:serviceaccount:{NAMESPACE}:{sa}'"
        assert keys["matchConditions"] == [{"name": "not-the-operator", "expression": expected}]
        # The operator is told the same identity (namespace + service account from the pod).
        env = env_of(objs)
        assert env["SERVICE_ACCOUNT_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}
        assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        # The operator's own admission code decides by userInfo too, not by the managed-by label.
        assert "user_info.username" in OPERATOR_SRC
        assert "MANAGED_BY_LABEL" not in OPERATOR_SRC
    # A named, pre-existing service account is the one exempted.
    values = {"webhook": {"enabled": True}, "serviceAccount": {"create": False, "name": "payments-sko"}}
    vwc = one(objects_of(render(values)), "ValidatingWebhookConfiguration")
    keys = next(w for w in vwc["webhooks"] if w["name"].startswith("no-literal-keys."))
    assert keys["matchConditions"][0]["expression"].endswith(f":{NAMESPACE}:payments-sko'")


def test_stripe_api_hosts_default_to_stripe_only_and_reach_the_operator():
    env = {k: v.get("value") for k, v in env_of(rendered("defaults")).items()}
    assert env["ALLOWED_API_HOSTS"] == "api.stripe.com"
    assert env["ALLOW_LOOPBACK_API"] == "false"
    values = {"stripeApi": {"allowedHosts": ["api.stripe.com", "stripe-egress.internal:8443"], "allowLoopback": True}}
    env = {k: v.get("value") for k, v in env_of(objects_of(render(values))).items()}
    assert env["ALLOWED_API_HOSTS"] == "api.stripe.com,stripe-egress.internal:8443"
    assert env["ALLOW_LOOPBACK_API"] == "true"
    # The operator's flag defaults to the same host.
    src = (REPO / "src" / "rules.rs").read_text()
    assert 'STRIPE_API_HOST: &str = "api.stripe.com"' in src


def test_webhook_in_namespaced_mode_sees_only_the_watched_namespaces():
    values = {**load_values("namespaced"), "webhook": {"enabled": True}}
    vwc = one(objects_of(render(values)), "ValidatingWebhookConfiguration")
    stripe = next(w for w in vwc["webhooks"] if w["name"].startswith("stripekeys."))
    watched = values["watchNamespaces"]
    assert reaches(stripe, "stripekeys.io", "stripekeypolicies", ns_labels(watched[0]), {})
    assert not reaches(stripe, "stripekeys.io", "stripekeypolicies", ns_labels("elsewhere"), {})


def test_self_signed_mode_lets_the_operator_inject_its_own_ca():
    objs = rendered("webhook-and-scheduling")
    vwc = one(objs, "ValidatingWebhookConfiguration")
    env = {k: v.get("value") for k, v in env_of(objs).items()}
    assert env["WEBHOOK_CERT_MODE"] == "self-signed"
    assert env["WEBHOOK_CONFIG_NAME"] == vwc["metadata"]["name"]
    assert "WEBHOOK_CERT_DIR" not in env
    assert "cert-manager.io/inject-ca-from" not in vwc["metadata"].get("annotations", {})
    assert not [o for o in objs if o["apiVersion"].startswith("cert-manager.io/")]
    # The operator keeps <service>-tls in its namespace: Secret writes there are granted.
    for verb in ("get", "create", "update"):
        assert granted(objs, "", "secrets", verb, NAMESPACE, f"{FULLNAME}-webhook-tls")


def test_cert_manager_mode_issues_mounts_and_injects_the_certificate():
    objs = rendered("webhook-cert-manager")
    vwc = one(objs, "ValidatingWebhookConfiguration")
    cert = one(objs, "Certificate")
    assert vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/{cert['metadata']['name']}"
    svc = one(objs, "Service", f"{FULLNAME}-webhook")["metadata"]["name"]
    assert f"{svc}.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    assert cert["spec"]["issuerRef"] == {"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert cert["spec"]["duration"] == "2160h" and cert["spec"]["renewBefore"] == "360h"
    assert not [o for o in objs if o["kind"] == "Issuer"], "no chart Issuer when one is named"
    env = {k: v.get("value") for k, v in env_of(objs).items()}
    assert env["WEBHOOK_CERT_MODE"] == "files"
    assert env["WEBHOOK_INCLUDE_TEST_KEYS"] == "true"
    assert "WEBHOOK_CONFIG_NAME" not in env
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "webhook-tls")
    assert volume["secret"]["secretName"] == cert["spec"]["secretName"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "webhook-tls")
    assert env["WEBHOOK_CERT_DIR"] == mount["mountPath"] and mount["readOnly"] is True
    # Without an issuer name, the chart renders a self-signed Issuer for it.
    values = {"webhook": {"enabled": True, "certificate": {"mode": "cert-manager"}}}
    own = objects_of(render(values))
    issuer = one(own, "Issuer")
    assert issuer["spec"] == {"selfSigned": {}}
    assert one(own, "Certificate")["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]


def test_webhook_is_off_by_default_and_the_operator_is_told_so():
    objs = rendered("defaults")
    assert not [o for o in objs if o["kind"] == "ValidatingWebhookConfiguration"]
    assert env_of(objs)["WEBHOOK_CERT_MODE"]["value"] == "disabled"


def test_notes_say_how_to_opt_a_namespace_in():
    text = notes("webhook-cert-manager")
    assert "kubectl label namespace <namespace> stripekeys.io/no-literal-keys=enforce" in text
    assert "cert-manager issues the certificate" in text
    assert "Secret sko-stripe-key-operator-webhook-tls" in notes("webhook-and-scheduling")
    assert "no-literal-keys" not in notes("defaults")


def test_literal_keys_webhook_can_be_left_out():
    values = {"webhook": {"enabled": True, "literalKeys": {"enabled": False}}}
    vwc = one(objects_of(render(values)), "ValidatingWebhookConfiguration")
    assert [w["name"] for w in vwc["webhooks"]] == ["stripekeys.validate.stripekeys.io"]


# ---------------------------------------------------------------------------------------------
# values.schema.json
# ---------------------------------------------------------------------------------------------

SCHEMA = CHART / "values.schema.json"


def check_jsonschema(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("check-jsonschema"), *args], capture_output=True, text=True)


def test_schema_is_valid_and_accepts_the_defaults_and_every_values_file():
    proc = check_jsonschema("--check-metaschema", str(SCHEMA))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = [str(CHART / "values.yaml"), *(str(p) for p in VALUE_SETS.values() if p)]
    proc = check_jsonschema("--schemafile", str(SCHEMA), *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_there_are_bad_values_files():
    assert len(BAD_VALUES) >= 5


@pytest.mark.parametrize("path", BAD_VALUES, ids=lambda p: p.stem)
def test_check_jsonschema_refuses_bad_values(path):
    proc = check_jsonschema("--schemafile", str(SCHEMA), str(path))
    assert proc.returncode == 1, f"{path.name} was accepted:\n{proc.stdout}{proc.stderr}"
    assert "Schema validation errors were encountered" in proc.stdout + proc.stderr


@pytest.mark.parametrize("path", BAD_VALUES, ids=lambda p: p.stem)
def test_helm_schema_validation_refuses_bad_values_on_render(path):
    with pytest.raises(helm.HelmValuesError, match="schema"):
        render(yaml.safe_load(path.read_text()))


def schema_leaves(schema: dict, root: dict, prefix: str = "", nodes: set | None = None) -> dict[str, dict]:
    """Leaf schemas by dotted path; closed objects with properties are walked (and their paths
    added to `nodes`), after checking that they refuse unknown keys."""
    if "$ref" in schema:
        schema = resolve(root, schema["$ref"])
    out = {}
    if schema.get("type") == "object" and "properties" in schema:
        assert schema.get("additionalProperties") is False, f"{prefix or '<root>'} allows unknown keys"
        if nodes is not None and prefix:
            nodes.add(prefix)
        for key, sub in schema["properties"].items():
            out.update(schema_leaves(sub, root, f"{prefix}.{key}" if prefix else key, nodes))
    else:
        out[prefix] = schema
    return out


def resolve(root: dict, ref: str) -> dict:
    node = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def value_leaves(values: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(value_leaves(value, path))
        else:
            out[path] = value
    return out


def test_schema_types_every_value_and_closes_every_object():
    schema = json.loads(SCHEMA.read_text())
    nodes: set[str] = set()
    leaves = schema_leaves(schema, schema, nodes=nodes)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    values = value_leaves(defaults)
    for path in values:
        # free-form maps (labels, resources) are schema leaves one level up; an empty object
        # (affinity: {}) is a closed schema node
        owner = next((p for p in (path, path.rsplit(".", 1)[0]) if p in leaves or p in nodes), None)
        assert owner is not None, f"values.yaml has {path}, which the schema does not describe"
        if owner in leaves:
            assert "type" in leaves[owner] or "$ref" in leaves[owner], f"{owner} has no type"
    for path in leaves:
        described = any(v == path or v.startswith(path + ".") or path.startswith(v + ".") for v in values)
        assert described, f"the schema describes {path}, which values.yaml lacks"


def test_readme_table_documents_every_value():
    readme = (CHART / "README.md").read_text()
    rows = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", readme, flags=re.M))
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads(SCHEMA.read_text())
    nodes: set[str] = set()
    leaves = schema_leaves(schema, schema, nodes=nodes)
    for path in value_leaves(defaults):
        owner = path if (path in leaves or path in nodes) else path.rsplit(".", 1)[0]
        assert owner in rows, f"README.md has no row for {owner}"
    unknown = rows - set(leaves) - nodes
    assert not unknown, f"README rows for values that do not exist: {unknown}"


# ---------------------------------------------------------------------------------------------
# PrometheusRule (alerts, promtool) and the Grafana dashboard
# ---------------------------------------------------------------------------------------------

ALERTS_DIR = CHART / "tests" / "alerts"
ALERTS_TEST = ALERTS_DIR / "alerts.test.yaml"
DASHBOARD = CHART / "dashboards" / "stripe-key-operator.json"
ALERT_NAMES = {
    "StripeKeyOperatorKeyOverdue",
    "StripeKeyOperatorRotationFailing",
    "StripeKeyOperatorRolloutStuck",
    "StripeKeyOperatorOldKeyStillInUse",
    "StripeKeyOperatorKeyTampered",
    "StripeKeyOperatorKeyViewed",
    "StripeKeyOperatorCanaryTripped",
    "StripeKeyOperatorNoLeader",
    "StripeKeyOperatorWebhookForgeries",
    "StripeKeyOperatorWebhookSignedForgery",
}


def promtool() -> str:
    """promtool from .ci/cache/bin (what .ci/install-tools.sh installs), else PATH; never skipped."""
    local = REPO / ".ci" / "cache" / "bin" / "promtool"
    if local.exists():
        return str(local)
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool is not installed: run `bash .ci/install-tools.sh` (or `make tools`); the alert tests need it")
    return found


def prometheus_rule(values: dict | None) -> dict:
    return one(objects_of(render(values)), "PrometheusRule")


def rules_of(rule: dict) -> dict[str, dict]:
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def run_promtool_tests(rule: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """Writes the rendered groups as a plain rules file next to a copy of the promtool test file
    and runs `promtool check rules` (must pass) and then `promtool test rules`."""
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    check = subprocess.run([promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules_of(rule))} rules found" in check.stdout, check.stdout
    return subprocess.run([promtool(), "test", "rules", str(tmp_path / ALERTS_TEST.name)], capture_output=True, text=True)


def test_monitoring_objects_are_opt_in():
    kinds = {o["kind"] for o in rendered("defaults")}
    assert "PrometheusRule" not in kinds
    assert not [o for o in rendered("defaults") if o["kind"] == "ConfigMap"]


def test_rendered_rules_pass_promtool_check_and_unit_tests(tmp_path):
    rule = prometheus_rule({"prometheusRule": {"enabled": True}})
    assert set(rules_of(rule)) == ALERT_NAMES
    proc = run_promtool_tests(rule, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout, proc.stdout


def test_promtool_tests_catch_a_changed_threshold(tmp_path):
    """The promtool cases are tight: a margin one hour shorter makes the key "just inside the
    margin" fire, and promtool says so."""
    rule = prometheus_rule({"prometheusRule": {"enabled": True, "keyOverdue": {"marginSeconds": 3600}}})
    proc = run_promtool_tests(rule, tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert "alertname: StripeKeyOperatorKeyOverdue" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_silent_promtool_case():
    cases = yaml.safe_load(ALERTS_TEST.read_text())
    assert cases["rule_files"] == ["rules.yaml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for group in cases["tests"]:
        for t in group.get("alert_rule_test", []):
            (fires if t["exp_alerts"] else silent).add(t["alertname"])
    assert fires == ALERT_NAMES, f"alerts never shown firing: {ALERT_NAMES - fires}"
    assert silent == ALERT_NAMES, f"alerts never shown silent: {ALERT_NAMES - silent}"


def github_anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_severity_summary_description_and_a_runbook_in_the_readme():
    rule = prometheus_rule({"prometheusRule": {"enabled": True}})
    readme = (CHART / "README.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#{2,4} (.+)$", readme, flags=re.M)}
    base = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["runbookBaseUrl"]
    for name, r in rules_of(rule).items():
        assert r["labels"]["severity"] in {"critical", "warning"}, name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name
        url = r["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == base and anchor == name.lower(), url
        assert anchor in anchors, f"README.md has no runbook heading for {name} (#{anchor})"
        # the runbook section says what it means, what to check and what to do
        section = readme.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        for word in ("**Means**", "**Check**", "**Do**"):
            assert word in section, f"runbook of {name} lacks {word}"


def test_prometheus_rule_values_reach_the_rules():
    objs = rendered("monitoring")
    rule = one(objs, "PrometheusRule")
    meta = rule["metadata"]
    assert meta["namespace"] == "monitoring"
    assert meta["labels"]["release"] == "kube-prometheus-stack"
    assert meta["annotations"]["owner"] == "payments-platform"
    rules = rules_of(rule)
    assert "StripeKeyOperatorRolloutStuck" not in rules, "disabled alerts are left out"
    assert set(rules) == ALERT_NAMES - {"StripeKeyOperatorRolloutStuck"}
    for name, r in rules.items():
        assert r["labels"]["team"] == "payments", name
        assert r["annotations"]["runbook_url"] == f"https://runbooks.example.com/stripe-key-operator#{name.lower()}"
    overdue = rules["StripeKeyOperatorKeyOverdue"]
    assert overdue["labels"]["severity"] == "critical"
    assert overdue["expr"].strip().endswith("> 3600")
    # every operator series is selected by operatorSelector, every proxy series by proxySelector
    for name, r in rules.items():
        for metric, matchers in re.findall(r"(stripe_key_operator_[a-z_]+)(\{[^}]*\})?", r["expr"]):
            expected = 'container="verify-proxy"' if "webhook_proxy" in metric else 'job="stripe-keys", cluster="prod"'
            assert expected in matchers, (name, metric, matchers)
    forgeries = rules["StripeKeyOperatorWebhookForgeries"]["expr"]
    assert 'reason=~"no_matching_signature"' in forgeries and "[10m]" in forgeries and "> 0.5" in forgeries
    # the default selector is the job the chart's ServiceMonitor gives the operator's series
    default = rules_of(prometheus_rule({"prometheusRule": {"enabled": True}}))
    svc = one(rendered("defaults"), "Service", f"{FULLNAME}-metrics")["metadata"]["name"]
    assert f'job="{svc}"' in default["StripeKeyOperatorNoLeader"]["expr"]


def test_rendered_prometheus_rules_match_the_crd_shape(tmp_path):
    for values in ({"prometheusRule": {"enabled": True}}, load_values("monitoring")):
        manifest = tmp_path / "rule.json"
        manifest.write_text(json.dumps(prometheus_rule(values)))
        proc = check_jsonschema("--schemafile", str(ALERTS_DIR / "prometheusrule.schema.json"), str(manifest))
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # the schema is strict enough to refuse a misspelt field
    bad = prometheus_rule({"prometheusRule": {"enabled": True}})
    bad["spec"]["groups"][0]["rules"][0]["labells"] = {}
    manifest.write_text(json.dumps(bad))
    assert check_jsonschema("--schemafile", str(ALERTS_DIR / "prometheusrule.schema.json"), str(manifest)).returncode == 1


def test_servicemonitor_keeps_the_per_object_namespace_label():
    """The per-object series carry the policy's namespace; without honorLabels Prometheus
    renames it exported_namespace and the alerts would name the operator's namespace."""
    endpoint = one(rendered("servicemonitor"), "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["honorLabels"] is True


def test_dashboard_configmap_carries_the_sidecar_label_and_the_dashboard_file():
    objs = rendered("monitoring")
    cm = one(objs, "ConfigMap", f"{FULLNAME}-dashboards")
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "stripe"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "Payments"
    assert json.loads(cm["data"]["stripe-key-operator.json"]) == json.loads(DASHBOARD.read_text())
    default = one(objects_of(render({"dashboards": {"enabled": True}})), "ConfigMap")
    assert default["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert default["metadata"]["namespace"] == NAMESPACE


def dashboard_panels() -> list[dict]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return [p for p in out if p["type"] != "row"]


def test_dashboard_uses_the_datasource_and_namespace_variables():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["datasource"]["uid"] == "${datasource}"
    assert variables["namespace"]["includeAll"] and variables["namespace"]["multi"]
    panels = dashboard_panels()
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert "stripe_key_operator_" in t["expr"], (p["title"], t["expr"])
    # per-object panels follow the namespace variable
    per_object = [t["expr"] for p in panels for t in p["targets"] if re.search(r"key_created|old_key_in_use|rollout_stuck|webhook_proxy", t["expr"])]
    assert per_object and all('namespace=~"$namespace"' in e for e in per_object), per_object


def test_dashboard_shows_what_the_issue_asks_for():
    exprs = "\n".join(t["expr"] for p in dashboard_panels() for t in p["targets"])
    for needle in (
        "stripe_key_operator_key_created_timestamp_seconds",  # keys by age
        "sum by (trigger) (increase(stripe_key_operator_rotations_total",  # rotations by trigger
        "stripe_key_operator_rotation_failures_total",  # failures
        "sum by (account) (rate(stripe_key_operator_stripe_requests_total[",  # Stripe requests per account
        'stripe_key_operator_stripe_requests_total{code="429"}',  # 429s
        "stripe_key_operator_store_request_duration_seconds_bucket",  # store latency
        "stripe_key_operator_old_key_in_use",  # old keys held
    ):
        assert needle in exprs, needle
