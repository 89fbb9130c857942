"""The Helm chart: lint, render every configuration, validate against the Kubernetes API schemas,
check best practice (kube-score) and the properties this service depends on."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from consumer.settings import Settings
from tests.deploy.chart import (
    CHART,
    CI_VALUES,
    CONFIGURATIONS,
    FULLNAME,
    KUBE_SCORE,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    ROOT,
    all_containers,
    config_env,
    helm,
    of_kind,
    one,
    pod_spec,
    render,
    rendered_text,
    service_container,
    template,
    tool,
    values_args,
)

# Kinds that are not part of the Kubernetes API (CRDs of prometheus-operator and KEDA). No package
# registry ships their schemas, so their fields are checked by the tests below instead.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
}


def test_every_feature_has_a_ci_values_file():
    expected = {"gpu", "gpu-shared", "keda", "hpa", "monitoring", "sasl", "mtls", "catalog-init", "settings"}
    assert {name.removesuffix("-values.yaml") for name in CI_VALUES} >= expected


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_helm_lint_strict_passes(configuration):
    result = helm("lint", "--strict", str(CHART), *values_args(configuration))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_manifests_match_the_kubernetes_api_schemas(configuration, kube_version):
    """Strict schemas (unknown fields are errors) of the oldest supported and the newest Kubernetes."""
    docs = render(configuration)
    errors = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
        except SchemaNotFoundError as exc:
            errors.append(exc.message)
    assert not errors, "\n".join(errors)


def test_schema_validation_rejects_an_unknown_field():
    """The schema check above can fail: a misspelt field in a container is an error."""
    deployment = json.loads(json.dumps(one(render("default"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


# kube-score's default checks plus the optional seccomp, memory requests = limits and port checks.
# Disabled, on purpose: container-image-pull-policy (it wants Always; the images are multi-GB and
# pinned by tag or digest, so IfNotPresent is the right policy) and the CPU limit (throttling only
# adds latency to a CPU-bound embedder; memory is limited). Warnings are printed, criticals fail.
KUBE_SCORE_ARGS = [
    "score", "--output-format", "ci", "--kubernetes-version", "v" + KUBE_VERSIONS[0].rsplit(".", 1)[0],
    "--ignore-container-cpu-limit", "--ignore-test", "container-image-pull-policy",
    "--enable-optional-test", "container-seccomp-profile",
    "--enable-optional-test", "container-memory-requests-equal-limits",
    "--enable-optional-test", "container-ports-check",
    "--disable-ignore-checks-annotations", "-",
]


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_kube_score_finds_nothing_critical(configuration):
    core = [d for d in render(configuration) if (d["apiVersion"], d["kind"]) not in CUSTOM_KINDS]
    result = subprocess.run([tool(KUBE_SCORE), *KUBE_SCORE_ARGS], input=yaml.safe_dump_all(core),
                            capture_output=True, text=True, timeout=60)
    findings = [line for line in result.stdout.splitlines() if line.startswith(("[CRITICAL]", "[WARNING]"))]
    print("\n".join(findings))
    assert result.returncode == 0, "\n".join(findings) + result.stderr
    assert not [f for f in findings if f.startswith("[CRITICAL]")]


def test_kube_score_fails_a_privileged_writable_pod():
    """The best-practice check can fail: the same Deployment, made unsafe, is rejected."""
    deployment = json.loads(json.dumps(one(render("default"), "Deployment")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"].update(privileged=True, readOnlyRootFilesystem=False)
    result = subprocess.run([tool(KUBE_SCORE), *KUBE_SCORE_ARGS], input=yaml.safe_dump(deployment),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "[CRITICAL]" in result.stdout


# --- Pod Security "restricted", read-only root filesystem ---------------------------------------


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_pods_meet_pod_security_restricted_with_a_read_only_root(configuration):
    spec = pod_spec(render(configuration))
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    for container in all_containers(spec):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc.get("runAsUser", pod["runAsUser"]) != 0, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), container["name"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        assert not sc.get("privileged"), container["name"]


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_only_emptydirs_are_writable_and_scratch_is_one(configuration):
    spec = pod_spec(render(configuration))
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert not any("hostPath" in v for v in volumes.values())
    for container in all_containers(spec):
        for mount in container.get("volumeMounts", []):
            if not mount.get("readOnly"):
                assert "emptyDir" in volumes[mount["name"]], f"{container['name']} writes to {mount['name']}"
    scratch = {m["mountPath"]: m["name"] for m in service_container(spec)["volumeMounts"]}["/scratch"]
    assert volumes[scratch]["emptyDir"]["sizeLimit"]


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_service_account_token_is_not_mounted(configuration):
    docs = render(configuration)
    assert pod_spec(docs)["automountServiceAccountToken"] is False
    for account in of_kind(docs, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


# --- Probes, ports, resources, shutdown ---------------------------------------------------------


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_probes_hit_healthz_and_readyz_on_the_metrics_port(configuration):
    docs = render(configuration)
    container = service_container(pod_spec(docs))
    port = int(config_env(docs)["SHELFMATCH_METRICS_PORT"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # The HTTP server starts after the model is loaded: a startup probe holds liveness off until then.
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert config_env(docs)["SHELFMATCH_METRICS_HOST"] == "0.0.0.0"
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}]


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_every_container_has_requests_and_a_memory_limit(configuration):
    for container in all_containers(pod_spec(render(configuration))):
        resources = container["resources"]
        assert {"cpu", "memory", "ephemeral-storage"} <= resources["requests"].keys(), container["name"]
        assert {"memory", "ephemeral-storage"} <= resources["limits"].keys(), container["name"]


def test_gpu_values_request_one_gpu_and_force_cuda():
    docs = render("gpu-values.yaml")
    spec = pod_spec(docs)
    resources = service_container(spec)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    assert config_env(docs)["SHELFMATCH_DEVICE"] == "cuda"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"


def test_shared_gpu_values_ask_for_one_replica_of_the_shared_resource():
    """Several pods per GPU go through the device plugin's sharing: each pod asks for one replica of
    the renamed resource (the plugin refuses more than one), never a whole nvidia.com/gpu."""
    docs = render("gpu-shared-values.yaml")
    resources = service_container(pod_spec(docs))["resources"]
    assert resources["limits"] == {**resources["limits"], "nvidia.com/gpu.shared": 1}
    assert resources["requests"]["nvidia.com/gpu.shared"] == 1
    assert "nvidia.com/gpu" not in resources["limits"] and "nvidia.com/gpu" not in resources["requests"]
    assert config_env(docs)["SHELFMATCH_DEVICE"] == "cuda"


def test_default_values_request_no_gpu_and_run_on_the_cpu():
    docs = render("default")
    resources = service_container(pod_spec(docs))["resources"]
    assert not any("gpu" in k for part in resources.values() for k in part)
    assert config_env(docs)["SHELFMATCH_DEVICE"] == "cpu"


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_grace_period_outlasts_the_sigterm_drain(configuration):
    docs = render(configuration)
    drain = float(config_env(docs)["SHELFMATCH_SHUTDOWN_TIMEOUT_S"])
    assert pod_spec(docs)["terminationGracePeriodSeconds"] >= drain + 15


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_selectors_match_the_pods(configuration):
    docs = render(configuration)
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return selector.items() <= pod_labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(one(docs, "Service")["spec"]["selector"])
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert selects(pdb["spec"]["selector"]["matchLabels"])
    for policy in of_kind(docs, "NetworkPolicy"):
        assert selects(policy["spec"]["podSelector"]["matchLabels"])
    for constraint in pod_spec(docs).get("topologySpreadConstraints", []):
        assert selects(constraint["labelSelector"]["matchLabels"])
    for monitor in of_kind(docs, "ServiceMonitor"):
        service = one(docs, "Service")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_every_object_carries_the_standard_labels(configuration):
    for doc in render(configuration):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "shelfmatch"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("shelfmatch-")


# --- Settings: the ConfigMap is the service's environment ----------------------------------------


def _settings_env_names() -> set[str]:
    return {f"SHELFMATCH_{name.upper()}" for name in Settings.model_fields}


def _readme_env_names() -> set[str]:
    table = (ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(SHELFMATCH_[A-Z0-9_]+)` \|", table, flags=re.M))


def _chart_env_names(docs) -> set[str]:
    container = service_container(pod_spec(docs))
    return set(config_env(docs)) | {e["name"] for e in container.get("env", []) if e["name"].startswith("SHELFMATCH_")}


def test_the_chart_can_set_every_setting_in_the_readme():
    readme = _readme_env_names()
    assert len(readme) >= 29, "the README's settings table was not found"
    covered = set().union(*(_chart_env_names(render(c)) for c in CONFIGURATIONS))
    assert readme <= covered, f"not settable through the chart: {sorted(readme - covered)}"


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_the_chart_sets_only_real_settings(configuration):
    unknown = _chart_env_names(render(configuration)) - _settings_env_names()
    assert not unknown, f"the service has no such settings: {sorted(unknown)}"


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_the_service_accepts_the_rendered_settings(configuration, monkeypatch):
    """The ConfigMap, plus stand-ins for the Secret-backed variables, builds the service's Settings."""
    docs = render(configuration)
    for var in [v for v in __import__("os").environ if v.startswith("SHELFMATCH_")]:
        monkeypatch.delenv(var)
    for name, value in config_env(docs).items():
        monkeypatch.setenv(name, value)
    for env in service_container(pod_spec(docs)).get("env", []):
        if env["name"].startswith("SHELFMATCH_"):
            monkeypatch.setenv(env["name"], env.get("value", "from-a-secret"))
    settings = Settings()
    assert str(settings.catalog).startswith("/catalog/")
    assert settings.metrics_port == one(docs, "Service")["spec"]["ports"][0]["port"]


def test_settings_values_reach_the_service():
    env = config_env(render("settings-values.yaml"))
    assert env["SHELFMATCH_THRESHOLD"] == "0.7" and env["SHELFMATCH_MIN_MARGIN"] == "0.02"
    assert env["SHELFMATCH_CATALOG"] == "/catalog/grocery-v7.safetensors"
    assert env["SHELFMATCH_CATALOG_POLL_S"] == "30"
    assert env["SHELFMATCH_SHUTDOWN_TIMEOUT_S"] == "45" and env["SHELFMATCH_ALLOWED_FORMATS"] == "JPEG,PNG"


def test_a_settings_change_rolls_the_pods():
    def checksum(*args):
        result = template(*args)
        assert result.returncode == 0, result.stderr
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        return one(tuple(docs), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum() != checksum("--set", "settings.batchSize=16")


# --- Secrets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_no_secret_value_is_rendered(configuration):
    docs = render(configuration)
    assert not of_kind(docs, "Secret")
    assert not any(re.search(r"PASSWORD|SECRET|TOKEN|USERNAME", key) for key in config_env(docs))
    for container in all_containers(pod_spec(docs)):
        for env in container.get("env", []):
            if re.search(r"PASSWORD|SECRET|TOKEN|USERNAME|KEY", env["name"]):
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_a_literal_sasl_user_name_is_rendered_and_the_password_still_comes_from_the_secret():
    """Strimzi's KafkaUser Secrets hold only `password`: the user name is the KafkaUser's name."""
    result = template("-f", str(CHART / "ci" / "sasl-values.yaml"), "--set", "kafka.sasl.username=shelfmatch-prod")
    assert result.returncode == 0, result.stderr
    docs = tuple(d for d in yaml.safe_load_all(result.stdout) if d)
    env = {e["name"]: e for e in service_container(pod_spec(docs))["env"]}
    assert env["SHELFMATCH_SASL_USERNAME"] == {"name": "SHELFMATCH_SASL_USERNAME", "value": "shelfmatch-prod"}
    assert env["SHELFMATCH_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    auth = one(docs, "TriggerAuthentication")["spec"]
    assert auth["env"] == [{"parameter": "username", "name": "SHELFMATCH_SASL_USERNAME", "containerName": "shelfmatch"}]
    assert {r["parameter"] for r in auth["secretTargetRef"]} == {"password", "ca"}


def test_mutual_tls_mounts_the_client_certificate_from_its_secret():
    docs = render("mtls-values.yaml")
    spec = pod_spec(docs)
    env = config_env(docs)
    mount = {m["name"]: m for m in service_container(spec)["volumeMounts"]}["kafka-client-cert"]
    volume = {v["name"]: v for v in spec["volumes"]}["kafka-client-cert"]["secret"]
    assert mount["readOnly"] is True and "subPath" not in mount  # renewed files are refreshed in place
    assert volume["secretName"] == "shelfmatch" and volume["defaultMode"] == 0o440
    paths = {i["key"]: f"{mount['mountPath']}/{i['path']}" for i in volume["items"]}
    assert env["SHELFMATCH_SSL_CERTFILE"] == paths["user.crt"] and env["SHELFMATCH_SSL_KEYFILE"] == paths["user.key"]
    assert env["SHELFMATCH_SECURITY_PROTOCOL"] == "SSL" and "SHELFMATCH_SSL_CAFILE" in env
    assert "SHELFMATCH_SASL_USERNAME" not in {e["name"] for e in service_container(spec).get("env", [])}
    auth = one(docs, "TriggerAuthentication")["spec"]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["secretTargetRef"]}
    assert refs == {"ca": ("my-cluster-cluster-ca-cert", "ca.crt"), "cert": ("shelfmatch", "user.crt"),
                    "key": ("shelfmatch", "user.key")}
    assert one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["tls"] == "enable"


# --- Network ------------------------------------------------------------------------------------


def test_egress_is_open_unless_asked_for():
    policy = one(render("default"), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"] and "egress" not in policy


def test_egress_reaches_only_the_brokers_and_dns():
    docs = render("mtls-values.yaml")
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    brokers, dns = policy["egress"]
    assert brokers["to"][0] == {"ipBlock": {"cidr": "10.20.0.0/16"}}
    assert brokers["to"][1]["podSelector"]["matchLabels"]["strimzi.io/cluster"] == "my-cluster"
    # The ports of the bootstrap servers, when none are listed.
    bootstrap = config_env(docs)["SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS"].split(",")
    bootstrap_ports = {int(a.rsplit(":", 1)[1]) for a in bootstrap}
    assert {p["port"] for p in brokers["ports"]} == bootstrap_ports == {9093, 9094}
    assert all(p["protocol"] == "TCP" for p in brokers["ports"])
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [(53, "TCP"), (53, "UDP")]


def test_egress_broker_ports_and_extra_rules_come_from_values():
    result = template("-f", str(CHART / "ci" / "mtls-values.yaml"),
                      "--set", "networkPolicy.egress.brokerPorts={9092,9095}",
                      "--set", "networkPolicy.egress.extraRules[0].ports[0].port=443")
    assert result.returncode == 0, result.stderr
    policy = one(tuple(d for d in yaml.safe_load_all(result.stdout) if d), "NetworkPolicy")["spec"]
    assert [p["port"] for p in policy["egress"][0]["ports"]] == [9092, 9095]
    assert policy["egress"][2] == {"ports": [{"port": 443}]}


def test_sasl_credentials_and_ca_come_from_existing_secrets():
    docs = render("sasl-values.yaml")
    container = service_container(pod_spec(docs))
    env = {e["name"]: e for e in container["env"]}
    secret = {"name": "shelfmatch-kafka-credentials", "key": "user"}
    assert env["SHELFMATCH_SASL_USERNAME"]["valueFrom"]["secretKeyRef"] == secret
    assert env["SHELFMATCH_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "shelfmatch-kafka-credentials",
        "key": "password",
    }
    ca_file = config_env(docs)["SHELFMATCH_SSL_CAFILE"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volume = {v["name"]: v for v in pod_spec(docs)["volumes"]}["kafka-ca"]
    assert volume["secret"]["secretName"] == "kafka-cluster-ca"
    assert mounts["kafka-ca"]["readOnly"] is True
    (item,) = volume["secret"]["items"]
    assert ca_file == f"{mounts['kafka-ca']['mountPath']}/{item['path']}" and item["key"] == "ca.crt"
    # KEDA reads the lag with the same Secrets.
    auth = one(docs, "TriggerAuthentication")
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "username": ("shelfmatch-kafka-credentials", "user"),
        "password": ("shelfmatch-kafka-credentials", "password"),
        "ca": ("kafka-cluster-ca", "ca.crt"),
    }
    trigger = one(docs, "ScaledObject")["spec"]["triggers"][0]
    assert trigger["metadata"]["sasl"] == "scram_sha512" and trigger["metadata"]["tls"] == "enable"
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_a_password_in_values_is_rejected_not_rendered():
    canary = "hunter2-canary-value"
    result = template("-f", str(CHART / "ci" / "sasl-values.yaml"), "--set", f"kafka.sasl.password={canary}")
    assert result.returncode != 0 and "password" in result.stderr
    assert canary not in result.stdout


# --- Autoscaling and the render-time guards -----------------------------------------------------


def test_keda_scales_on_the_services_own_group_and_topic_up_to_the_partition_count():
    docs = render("keda-values.yaml")
    scaled = one(docs, "ScaledObject")
    env = config_env(docs)
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == env["SHELFMATCH_GROUP_ID"]
    assert trigger["metadata"]["topic"] == env["SHELFMATCH_INPUT_TOPIC"]
    assert trigger["metadata"]["bootstrapServers"] == env["SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS"]
    assert trigger["metadata"]["offsetResetPolicy"] == "earliest"
    assert all(isinstance(v, str) for v in trigger["metadata"].values())
    assert scaled["spec"]["maxReplicaCount"] == 6 <= 12
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert "replicas" not in one(docs, "Deployment")["spec"]
    assert not of_kind(docs, "HorizontalPodAutoscaler")


def test_autoscalers_default_to_one_replica_per_partition():
    docs = render("sasl-values.yaml")  # keda without maxReplicaCount, 8 partitions
    assert one(docs, "ScaledObject")["spec"]["maxReplicaCount"] == 8
    docs = render("hpa-values.yaml")  # 6 partitions
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] == 6 and hpa["spec"]["minReplicas"] == 2
    assert "replicas" not in one(docs, "Deployment")["spec"]
    assert not of_kind(docs, "ScaledObject")


def test_keda_at_exactly_the_partition_count_is_allowed():
    result = template(
        "--set", "keda.enabled=true", "--set", "kafka.inputPartitions=4", "--set", "keda.maxReplicaCount=4"
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["keda.enabled=true", "kafka.inputPartitions=4", "keda.maxReplicaCount=5"],
            "keda.maxReplicaCount (5) must not exceed kafka.inputPartitions (4)",
        ),
        (["keda.enabled=true"], "kafka.inputPartitions is required"),
        (
            ["hpa.enabled=true", "kafka.inputPartitions=3", "hpa.maxReplicas=4"],
            "hpa.maxReplicas (4) must not exceed kafka.inputPartitions (3)",
        ),
        (["keda.enabled=true", "hpa.enabled=true", "kafka.inputPartitions=4"], "mutually exclusive"),
        (
            ["keda.enabled=true", "kafka.inputPartitions=4", "keda.minReplicaCount=6"],
            "keda.minReplicaCount (6) must not exceed keda.maxReplicaCount (4)",
        ),
        (["replicaCount=5", "kafka.inputPartitions=4"], "replicaCount (5) must not exceed kafka.inputPartitions (4)"),
        (["kafka.securityProtocol=SASL_SSL"], "needs kafka.sasl.existingSecret"),
        (["kafka.tls.caSecret=kafka-ca"], "only used with SSL or SASL_SSL"),
        (["terminationGracePeriodSeconds=30"], "must be longer than settings.shutdownTimeoutS (30)"),
        (["catalog.source=initContainer"], "needs catalog.initContainer.image.repository"),
        (["settings.device=cuda"], "gpu.enabled is false"),
        (["catalog.source=s3"], "/catalog/source"),  # the values schema already refuses it
        (["minReadySeconds=60"], "minReadySeconds (60) must be above 60 s"),
        (["kafka.tls.clientCertSecret=shelfmatch"], "a client certificate is only sent over SSL or SASL_SSL"),
        (["networkPolicy.egress.enabled=true"], "needs networkPolicy.egress.brokerCIDRs or brokerPeers"),
        (["networkPolicy.egress.enabled=true", "networkPolicy.egress.brokerCIDRs={10.0.0.0/8}",
          "kafka.bootstrapServers=kafka"], "has no port"),
        (["kafka.sasl.password=x"], "password"),
        (["progressDeadlineSeconds=300"],
         "progressDeadlineSeconds (300) must exceed the startup probe's budget (300 s)"),
        (["podDisruptionBudget.unhealthyPodEvictionPolicy=Always"], "unhealthyPodEvictionPolicy"),
    ],
)
def test_unsafe_values_are_rejected_at_render_time(overrides, message):
    args = [a for o in overrides for a in ("--set", o)]
    result = template(*args)
    assert result.returncode != 0, f"rendered although {overrides}"
    assert message in result.stderr, result.stderr


# --- Catalogue --------------------------------------------------------------------------------


def test_catalogue_from_a_pvc_is_mounted_read_only():
    docs = render("default")
    spec = pod_spec(docs)
    volume = {v["name"]: v for v in spec["volumes"]}["catalog"]
    assert volume["persistentVolumeClaim"] == {"claimName": f"{FULLNAME}-catalog", "readOnly": True}
    mount = {m["name"]: m for m in service_container(spec)["volumeMounts"]}["catalog"]
    assert mount["readOnly"] is True
    assert config_env(docs)["SHELFMATCH_CATALOG"] == f"{mount['mountPath']}/catalog.safetensors"
    assert "initContainers" not in spec


def test_catalogue_from_an_init_container_is_shared_through_an_emptydir():
    docs = render("catalog-init-values.yaml")
    spec = pod_spec(docs)
    (init,) = spec["initContainers"]
    volume = {v["name"]: v for v in spec["volumes"]}["catalog"]
    assert volume["emptyDir"]["sizeLimit"] == "3Gi"
    init_mount = {m["name"]: m for m in init["volumeMounts"]}["catalog"]
    service_mount = {m["name"]: m for m in service_container(spec)["volumeMounts"]}["catalog"]
    assert not init_mount.get("readOnly") and service_mount["readOnly"] is True
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["CATALOG_FILE"] == config_env(docs)["SHELFMATCH_CATALOG"]
    assert init["image"] == "registry.example.com/tools/object-fetch:2.3"
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["shelfmatch.io/catalog-revision"] == "abafe086f561"


# --- Monitoring objects -------------------------------------------------------------------------


def test_monitoring_objects_are_off_by_default_and_on_behind_flags():
    default_kinds = {d["kind"] for d in render("default")}
    assert not default_kinds & {"ServiceMonitor", "PrometheusRule", "ScaledObject", "HorizontalPodAutoscaler"}
    monitoring = render("monitoring-values.yaml")
    assert one(monitoring, "ServiceMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert one(monitoring, "PrometheusRule")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (dashboard,) = [d for d in of_kind(monitoring, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_pod_disruption_budget_never_blocks_a_drain_of_a_single_replica():
    pdb = one(render("default"), "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                           "selector": pdb["spec"]["selector"]}


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_pod_disruption_budget_lets_a_drain_evict_pods_that_are_not_ready(configuration):
    """During a broker outage every pod is NotReady; IfHealthyBudget would then block node drains."""
    assert one(render(configuration), "PodDisruptionBudget")["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def _deployment(*sets: str) -> dict:
    result = template(*[a for s in sets for a in ("--set", s)])
    assert result.returncode == 0, result.stderr
    return one(tuple(d for d in yaml.safe_load_all(result.stdout) if d), "Deployment")


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_a_pod_counts_as_available_only_after_a_failed_publish_would_have_shown(configuration):
    """minReadySeconds outlasts the publish timeout plus the readiness probe's failures."""
    docs = render(configuration)
    spec = one(docs, "Deployment")["spec"]
    readiness = service_container(pod_spec(docs))["readinessProbe"]
    publish_s = int(config_env(docs)["SHELFMATCH_PUBLISH_TIMEOUT_MS"]) / 1000
    assert spec["minReadySeconds"] > publish_s + readiness["periodSeconds"] * readiness["failureThreshold"]


def test_min_ready_seconds_follows_the_publish_timeout_and_the_readiness_probe():
    assert _deployment()["spec"]["minReadySeconds"] == 30 + 3 * 10 + 10
    assert _deployment("kafka.publishTimeoutMs=90500")["spec"]["minReadySeconds"] == 91 + 30 + 10
    assert _deployment("probes.readiness.periodSeconds=5")["spec"]["minReadySeconds"] == 30 + 15 + 10
    assert _deployment("minReadySeconds=120")["spec"]["minReadySeconds"] == 120


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_the_progress_deadline_outlasts_a_slow_but_healthy_start(configuration):
    docs = render(configuration)
    spec = one(docs, "Deployment")["spec"]
    startup = service_container(pod_spec(docs))["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    # An image pull of several GB on a cold node comes on top of the startup probe's budget.
    assert spec["progressDeadlineSeconds"] >= budget + spec["minReadySeconds"] + 600


def test_no_templating_leftovers_in_the_manifests():
    for configuration in CONFIGURATIONS:
        assert "<no value>" not in rendered_text(configuration), configuration
        for doc in render(configuration):
            if doc["metadata"]["name"].endswith("-dashboard"):
                continue  # Grafana's own {{label}} legend templates
            text = yaml.safe_dump(doc)
            # Alert templates ({{ $labels }}, {{ $value }}) are Prometheus'; nothing else may remain.
            leftovers = [m for m in re.findall(r"\{\{[^}]*\}\}", text) if "$labels" not in m and "$value" not in m]
            assert not leftovers, (configuration, doc["kind"], leftovers)


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_notes_render_for_every_configuration(configuration, tmp_path):
    """helm template skips NOTES.txt, so a copy of the chart wraps it in a ConfigMap to render it."""
    chart = tmp_path / "shelfmatch"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "notes-preview.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-preview\ndata:\n  notes: |\n"
        '    {{- include (print $.Template.BasePath "/NOTES.txt") . | nindent 4 }}\n'
    )
    result = helm(
        "template",
        RELEASE,
        str(chart),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSIONS[0],
        "--show-only",
        "templates/notes-preview.yaml",
        *values_args(configuration),
    )
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["data"]["notes"]
    assert "<no value>" not in notes and f"deployment/{FULLNAME}" in notes
