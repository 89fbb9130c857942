"""The Helm chart as the deploy tests see it: rendered by the cached helm binary, read as YAML.

Tools come from `make tools` (helm, kube-score in .cache/tools/) and the test extra (hadolint,
kubernetes-validate in the virtual environment); nothing is fetched while the tests run.
"""
from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "shelfmatch"
TOOLS = ROOT / ".cache" / "tools"
HELM = TOOLS / "helm"
KUBE_SCORE = TOOLS / "kube-score"
PROMTOOL = TOOLS / "promtool"
HADOLINT = Path(sys.executable).parent / "hadolint"

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas at hand.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
RELEASE = "shop"
NAMESPACE = "retail"

CI_VALUES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
# "default" renders values.yaml alone; the others add one ci/ file each.
CONFIGURATIONS = ["default", *CI_VALUES]


def tool(path: Path) -> str:
    """Path of a cached tool, or a test failure that says how to get it (never a silent skip)."""
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make tools` (it builds the deployment checkers once)")
    return str(path)


def values_args(configuration: str) -> list[str]:
    return [] if configuration == "default" else ["-f", str(CHART / "ci" / configuration)]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool(HELM), *args], capture_output=True, text=True, timeout=120)


def template(*args: str, kube_version: str = KUBE_VERSIONS[0]) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with extra arguments (values files, --set)."""
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version, *args)


@functools.cache
def rendered_text(configuration: str) -> str:
    result = template(*values_args(configuration))
    assert result.returncode == 0, f"helm template ({configuration}) failed:\n{result.stderr}"
    return result.stdout


@functools.cache
def render(configuration: str) -> tuple[dict, ...]:
    """The manifests of one configuration (read-only: shared between tests)."""
    return tuple(d for d in yaml.safe_load_all(rendered_text(configuration)) if d)


def of_kind(docs: tuple[dict, ...], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: tuple[dict, ...], kind: str) -> dict:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(docs: tuple[dict, ...]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def service_container(spec: dict) -> dict:
    (container,) = [c for c in spec["containers"] if c["name"] == "shelfmatch"]
    return container


FULLNAME = f"{RELEASE}-shelfmatch"


def config_env(docs: tuple[dict, ...]) -> dict[str, str]:
    """SHELFMATCH_* variables the settings ConfigMap gives the service."""
    (settings,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == FULLNAME]
    return dict(settings["data"])
