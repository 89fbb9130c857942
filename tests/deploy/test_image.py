"""The image built for real by ``make image`` (podman, chroot isolation, on a Debian base made by
mmdebstrap; no Docker engine here, see docs/operations.md): what it is configured to do, its size,
that code sits in its own small layer, and a smoke run of its entrypoint as UID 10001 with a
read-only root and only /scratch writable, against the real broker.

``podman run`` cannot start containers on this machine, so the smoke run mounts the image's root
filesystem (``podman create`` + ``podman mount``) and runs it with ``chroot --userspec`` in a
private mount namespace (``unshare -m``) where that root is bind-mounted read-only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import photos as P
from tests.deploy.chart import ROOT
from tests.kafka import produce, read_until
from tests.service import Service

IMAGE_OUT = ROOT / "out" / "image"
OPERATIONS = ROOT / "docs" / "operations.md"
# The CUDA variant: torch and the nvidia-* wheels are nearly all of it (docs/operations.md).
SIZE_BUDGET_GB = 8.0
# What a code-only change may add to a rebuild: our own code and the (empty) weights directory.
CODE_LAYERS_BUDGET_BYTES = 5 * 1024 * 1024
UID = 10001


def podman(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
    return result.stdout


def stamp(name: str) -> str:
    """The id ``make image`` recorded; a failure that says how to get it (never a silent skip)."""
    path = IMAGE_OUT / name
    if not path.is_file() or shutil.which("podman") is None:
        pytest.fail(f"{path} is missing: run `make image` (it builds the Dockerfile with podman)")
    return path.read_text().strip()


@pytest.fixture(scope="module")
def image() -> dict:
    return json.loads(podman("image", "inspect", stamp("image.id")))[0]


def history(image_id: str) -> list[tuple[str, str, int]]:
    """(when, instruction, bytes added) per build step, newest first (``podman history``). A step
    taken from the layer cache keeps its time; intermediate ids are not listed for every step."""
    steps = json.loads(podman("history", "--no-trunc", "--format", "json", image_id))
    return [(step["created"], step["CreatedBy"], step["size"]) for step in steps]


def layer_digests(image_id: str) -> list[str]:
    return json.loads(podman("image", "inspect", image_id))[0]["RootFS"]["Layers"]


def test_the_built_image_runs_the_consumer_as_the_numeric_non_root_user(image):
    config = image["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["shelfmatch", "consume"]
    assert config["WorkingDir"] == "/scratch" and "/scratch" in config["Volumes"]
    assert "docker" in image["ManifestType"]  # the OCI format would have dropped SHELL and HEALTHCHECK
    assert "/healthz" in " ".join(image["Healthcheck"]["Test"])
    assert image["Labels"]["io.shelfmatch.variant"] == "cuda"
    assert image["Parent"] or image["RootFS"]["Layers"]


def test_the_image_fits_its_size_budget_and_the_docs_say_both(image):
    size_gb = image["Size"] / 1e9
    assert size_gb <= SIZE_BUDGET_GB, f"{size_gb:.2f} GB"
    docs = OPERATIONS.read_text()
    assert f"size budget of {SIZE_BUDGET_GB:.1f} GB" in docs
    measured = re.search(r"measured: ([\d.]+) GB", docs)
    assert measured, "docs/operations.md records the measured size"
    assert abs(float(measured.group(1)) - size_gb) <= 0.25 * size_gb  # the docs follow the image


def test_a_code_only_change_rebuilds_only_the_small_last_layers(image, tmp_path):
    """The dependencies are one layer of their own: a change to our code reuses it (same digest)
    and the rebuild differs only in layers that together stay under a few MB."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "requirements.lock", "README.md"):
        shutil.copy2(ROOT / name, context / name)
    for package in ("catalog", "consumer"):
        shutil.copytree(ROOT / package, context / package, ignore=shutil.ignore_patterns("__pycache__"))
    with (context / "consumer" / "cli.py").open("a") as f:
        f.write("\n# a code-only change (tests/deploy/test_image.py)\n")
    iidfile = tmp_path / "changed.id"
    uv_cache = subprocess.run([str(ROOT / ".venv" / "bin" / "uv"), "cache", "dir"], capture_output=True, text=True,
                              check=True).stdout.strip()
    podman("build", "--isolation=chroot", "--format", "docker", "--build-arg", f"PYTHON_IMAGE={stamp('base.id')}",
           "-v", f"{uv_cache}:/root/.cache/uv", "--iidfile", str(iidfile), str(context), timeout=900)
    changed_id = iidfile.read_text().strip()
    try:
        before, after = history(image["Id"]), history(changed_id)
        rebuilt = [step for step in after if step not in before]
        assert rebuilt, "the change did not reach the image"
        deps = max(before, key=lambda step: step[2])
        assert "COPY" in deps[1] and deps[2] > 1e9, deps  # the dependency layer: GBs, copied from its stage
        assert deps in after, "the dependency layer was rebuilt"
        assert sum(size for _, _, size in rebuilt) <= CODE_LAYERS_BUDGET_BYTES, rebuilt
        old, new = layer_digests(image["Id"]), layer_digests(changed_id)
        assert len(old) == len(new) and old[:-2] == new[:-2] and old[-1] != new[-1]  # only weights and code differ
    finally:
        podman("rmi", changed_id)


def sandbox(root: str, catalog_dir: Path, user: str, argv: list[str], env: dict[str, str]) -> list[str]:
    """``argv`` in the image's root filesystem as ``user``: a private mount namespace where the root
    is read-only, /dev a read-only tmpfs with the five character devices a process expects,
    /scratch a fresh tmpfs owned by the user, and /catalog the catalogue, read-only."""
    script = (
        'set -e; r="$1"; catalog="$2"; user="$3"; shift 3; '
        'mount --bind "$r" "$r"; mount -o remount,bind,ro "$r"; '
        'mount -t proc proc "$r/proc"; '
        'mount -t tmpfs -o mode=0755,size=64k dev "$r/dev"; '
        'for d in null zero full random urandom; do touch "$r/dev/$d"; mount --bind "/dev/$d" "$r/dev/$d"; done; '
        'mount -o remount,ro "$r/dev"; '
        f'mount -t tmpfs -o mode=0700,uid={UID},gid={UID},size=256m scratch "$r/scratch"; '
        'mount --bind "$catalog" "$r/catalog"; mount -o remount,bind,ro "$r/catalog"; '
        'exec chroot --userspec="$user" "$r" /usr/bin/env -i --chdir=/scratch "$@"'
    )
    pairs = [f"{k}={v}" for k, v in env.items()]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sandbox", root, str(catalog_dir),
            user, *pairs, *argv]


class ImageService(Service):
    """The image's entrypoint with the image's environment plus ``settings``, in :func:`sandbox`."""

    def __init__(self, root: str, config: dict, catalog_dir: Path, settings: dict[str, str], log_path: Path) -> None:
        super().__init__(settings, log_path)
        image_env = dict(item.split("=", 1) for item in config["Env"])
        self.env = {**image_env, "SHELFMATCH_METRICS_HOST": "127.0.0.1", "SHELFMATCH_METRICS_PORT": str(self.port),
                    "SHELFMATCH_DEVICE": "cpu", **settings}
        self.place = (root, catalog_dir, config["User"])
        self.argv = sandbox(*self.place, [*config["Entrypoint"], *(config.get("Cmd") or [])], self.env)

    def start(self) -> ImageService:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env={"PATH": os.environ["PATH"]}, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """A one-off command in the same sandbox."""
        command = sandbox(*self.place, list(argv), self.env)
        return subprocess.run(command, env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60)


@pytest.fixture
def rootfs(image) -> Iterator[str]:
    container = podman("create", image["Id"]).strip()
    try:
        yield podman("mount", container).strip()
    finally:
        podman("umount", container)
        podman("rm", container)


@pytest.mark.integration
async def test_as_uid_10001_on_a_read_only_root_the_image_consumes_photos_and_publishes_events(
    image, rootfs, broker, topics, grocery_catalog, tmp_path
):
    catalog_dir = tmp_path / "catalog"
    catalog_dir.mkdir()
    catalog = catalog_dir / "catalog.safetensors"  # the image's default path
    shutil.copy(grocery_catalog[1], catalog)  # with the mode Catalog.save gave it: UID 10001 must read it
    svc = ImageService(rootfs, image["Config"], catalog_dir, {
        "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "SHELFMATCH_GROUP_ID": topics.group,
        "SHELFMATCH_INPUT_TOPIC": topics.input,
        "SHELFMATCH_OUTPUT_TOPIC": topics.output,
        "SHELFMATCH_DLQ_TOPIC": topics.dlq,
        "SHELFMATCH_BATCH_SIZE": "4",
        "SHELFMATCH_BATCH_MAX_WAIT_MS": "50",
        "SHELFMATCH_THRESHOLD": "0.7",  # the test catalogue is not calibrated
    }, tmp_path / "image.log")

    who = svc.run("python", "-c", "import os; print(os.getuid(), os.getgid())")
    assert who.stdout.split() == [str(UID), str(UID)], who.stderr
    # Which paths UID 10001 can create a file in: errno 30 is EROFS, so only /scratch is writable.
    tried = ["/scratch/x", "/opt/venv/x", "/tmp/x", "/catalog/x", "/dev/x"]
    writes = svc.run("python", "-c", "import sys\nfor p in sys.argv[1:]:\n try: open(p, 'w').close(); print(p)\n"
                     " except OSError as e: print(p, e.errno)", *tried)
    assert writes.stdout.splitlines() == [tried[0], *(f"{p} 30" for p in tried[1:])], writes

    items = P.store_photos()[::10]  # five real photos, one per product folder stride
    sent = await produce(broker.bootstrap, topics.input, [path.read_bytes() for path, _ in items],
                         keys=[f"cam-{i}".encode() for i in range(len(items))])
    try:
        svc.start()
        svc.wait_ready(timeout_s=240)
        records = await read_until(broker.bootstrap, topics.output,
                                   lambda rs: len({json.loads(r.value)["event_id"] for r in rs}) >= len(sent),
                                   timeout_s=240)
        events = {json.loads(r.value)["event_id"]: json.loads(r.value) for r in records}
        assert set(events) == {s.event_id for s in sent}
        assert all(e["catalog"]["version"] == grocery_catalog[0].version for e in events.values())
        assert svc.terminate() == 0, svc.log()  # SIGTERM drains and exits cleanly
    except BaseException:
        print(svc.log())
        raise
    finally:
        svc.close()
