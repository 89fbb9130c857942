"""The container image definition: hadolint, and the properties the chart and the service rely on.

The image itself is built and smoke-tested by tests/deploy/test_image.py (make image, podman).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry

from tests.deploy.chart import HADOLINT, ROOT, pod_spec, render, tool

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out, stage = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stage = args.split(" AS ")[-1].strip() if " AS " in args else args
        out.append((stage, instruction, re.sub(r"\s+", " ", args.strip())))
    return out


def _final(instruction: str) -> list[str]:
    items = _instructions()
    last_stage = items[-1][0]
    return [args for stage, ins, args in items if stage == last_stage and ins == instruction]


def _env(stage_args: list[str]) -> dict[str, str]:
    env = {}
    for args in stage_args:
        env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def test_hadolint_finds_nothing_at_the_strictest_threshold():
    result = subprocess.run(
        [tool(HADOLINT), "--failure-threshold", "style", "--disable-ignore-pragma", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_careless_dockerfile(tmp_path):
    """The lint can fail: latest tag, unpinned apt packages, root user."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install curl\nCMD python app.py\n")
    result = subprocess.run(
        [tool(HADOLINT), "--failure-threshold", "style", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


def test_the_image_is_multi_stage_with_cuda_by_default_and_a_cpu_variant():
    items = _instructions()
    stages = [args for _, ins, args in items if ins == "FROM"]
    assert len(stages) >= 3, stages
    text = DOCKERFILE.read_text()
    assert "ARG VARIANT=cuda" in text
    assert re.search(r"cpu\)\s+export UV_TORCH_BACKEND=cpu", text)
    assert re.search(r"\*\)\s+echo \"VARIANT must be cuda or cpu", text)


def test_dependencies_are_pinned_by_requirements_lock():
    run = " ".join(args for _, ins, args in _instructions() if ins == "RUN")
    assert "--constraints requirements.lock" in run
    assert "grep -vxF -f requirements.lock" in run  # every installed version is the lock's
    assert re.search(r"uv==\$\{UV_VERSION\}", run)
    makefile_uv = re.search(r"^UV_VERSION := (\S+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert f"ARG UV_VERSION={makefile_uv}" in DOCKERFILE.read_text()


def test_runs_as_the_non_root_user_the_chart_expects():
    (user,) = _final("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it
    for configuration in ("default", "gpu-values.yaml"):
        pod = pod_spec(render(configuration))["securityContext"]
        assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid), int(gid))


def test_writable_paths_point_at_the_scratch_volume_and_weights_are_read_only():
    env = _env(_final("ENV"))
    for name in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"):
        assert env[name].startswith("/scratch"), name
    assert env["TORCH_HOME"] == "/opt/torch"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert _final("VOLUME") == ['["/scratch"]']
    scratch = {m["name"]: m["mountPath"] for m in pod_spec(render("default"))["containers"][0]["volumeMounts"]}
    assert scratch["scratch"] == "/scratch"


def test_weights_can_be_baked_through_the_projects_own_loader():
    weights = [f"{ins} {args}" for stage, ins, args in _instructions() if stage == "weights"]
    assert 'ARG BAKE_WEIGHTS=""' in weights
    assert "ENV TORCH_HOME=/opt/torch" in weights
    assert any("from catalog.models import load_backbone" in a and "${BAKE_WEIGHTS}" in a for a in weights)
    assert "--from=weights /opt/torch /opt/torch" in _final("COPY")


def test_entrypoint_runs_the_consumer():
    assert [json.loads(e) for e in _final("ENTRYPOINT")] == [["shelfmatch", "consume"]]
    assert _final("STOPSIGNAL") == ["SIGTERM"]
    assert _final("EXPOSE") == ["9400"]


def _healthcheck_command() -> list[str]:
    (healthcheck,) = _final("HEALTHCHECK")
    assert "--start-period=" in healthcheck
    return json.loads(healthcheck.split(" CMD ", 1)[1])


def test_healthcheck_follows_the_services_healthz(monkeypatch):
    """The HEALTHCHECK one-liner, run against the service's real HTTP endpoint: 0 when the event
    loop ticks, non-zero when it has stalled."""
    from consumer.app import HEALTH_STALE_S, start_http
    from consumer.health import Health, Watchdog
    from consumer.settings import Settings

    command = _healthcheck_command()
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2]
    for var in [v for v in os.environ if v.startswith("SHELFMATCH_")]:
        monkeypatch.delenv(var)
    health = Health()
    server = start_http(Settings(metrics_host="127.0.0.1", metrics_port=0), CollectorRegistry(), health,
                        Watchdog(float("inf")))
    try:
        env = {**os.environ, "SHELFMATCH_METRICS_PORT": str(server.server_port)}

        def check() -> int:
            return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode

        health.last_tick = time.monotonic()
        assert check() == 0
        health.last_tick = time.monotonic() - HEALTH_STALE_S - 1
        assert check() != 0
    finally:
        server.shutdown()
        server.server_close()


def test_dockerignore_is_an_allow_list_of_what_the_image_installs():
    lines = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = {
        src.rstrip("/")
        for args in (a for _, ins, a in _instructions() if ins == "COPY" and "--from" not in a)
        for src in args.split()[:-1]
    }
    assert copied <= allowed, copied - allowed
    assert not allowed & {".venv", ".cache", ".git", "tests", "data"}


@pytest.mark.parametrize("path", ["catalog", "consumer", "pyproject.toml", "requirements.lock", "README.md"])
def test_the_build_context_holds_what_the_build_copies(path):
    assert (ROOT / path).exists()
