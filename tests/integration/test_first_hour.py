"""A new user's first hour, as a new user meets it: the README's "Using it" block run as it is from a
fresh folder, and each mistake from issue #20 ending in one line that names the setting or file and
what to do (exit 2 for configuration, no traceback). The CLI runs as a subprocess; the broker is real.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consumer.messages import MatchEvent
from tests.kafka import ROOT, create_topics, produce, read_until, unique
from tests.photos import PHOTOS, REFERENCES, store_photos
from tests.service import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def shelfmatch(*args: str, env: dict[str, str], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "consumer.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout_s)


def base_env(broker, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHELFMATCH_")}
    return {**env, "PATH": f"{BIN}:{env.get('PATH', '')}", "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "SHELFMATCH_DEVICE": "cpu", "SHELFMATCH_METRICS_HOST": "127.0.0.1",
            "SHELFMATCH_METRICS_PORT": str(free_port()), **extra}


def using_it_block() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using it"):]
    block = section[section.index("```sh\n") + len("```sh\n"):]
    return [line for line in block[: block.index("```")].splitlines() if line.strip() and not line.startswith("#")]


def start(command: list[str], *, env: dict[str, str], cwd: Path, log: Path | None = None) -> subprocess.Popen:
    """A long-running command, its output to ``log`` (or a pipe)."""
    out = open(log, "w") if log is not None else subprocess.PIPE
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)


def consume(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    return start([sys.executable, "-m", "consumer.cli", "consume"], env=env, cwd=cwd, log=log)


def assert_one_clear_line(result: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, no traceback, and a line starting 'shelfmatch:' that names each of ``names``."""
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    lines = [line for line in result.stderr.splitlines() if line.startswith("shelfmatch: ")]
    assert len(lines) == 1, out
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """A calibrated demo catalogue, built once for the service cases below."""
    folder = tmp_path_factory.mktemp("calibrated")
    env = {**os.environ, "SHELFMATCH_DEVICE": "cpu"}
    assert shelfmatch("catalog", "build", "--images", str(REFERENCES), "--model", "efficientnet_lite0",
                      "--device", "cpu", "--out", "c.safetensors", env=env, cwd=folder).returncode == 0
    assert shelfmatch("catalog", "calibrate", "--catalog", "c.safetensors", "--queries", str(PHOTOS),
                      "--device", "cpu", env=env, cwd=folder).returncode == 0
    return folder / "c.safetensors"


async def test_the_readmes_using_it_block_runs_as_written_and_gives_sensible_matches(broker, tmp_path):
    lines = using_it_block()
    setup = [line for line in lines if re.fullmatch(r"(export )?[A-Z_]+=\S+(\s+#.*)?", line)]  # variables only
    consume = next(i for i, line in enumerate(lines) if line.endswith("shelfmatch consume"))
    names = {"SHELFMATCH_INPUT_TOPIC": unique("in"), "SHELFMATCH_OUTPUT_TOPIC": unique("out"),
             "SHELFMATCH_DLQ_TOPIC": unique("dlq"), "SHELFMATCH_GROUP_ID": unique("g")}
    env = base_env(broker, DEMO=str(REFERENCES.parent), **names)

    def bash(commands: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(commands)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, **kwargs)

    before = bash(lines[:consume], timeout=600)
    assert before.returncode == 0, before.stdout + before.stderr
    assert "created" in before.stdout and "precision" in before.stdout

    log = tmp_path / "consume.log"
    service = start(["bash", "-c", "\n".join([*setup, "exec env " + lines[consume]])], env=env, cwd=tmp_path, log=log)
    try:
        photos = store_photos()
        sent = await produce(broker.bootstrap, names["SHELFMATCH_INPUT_TOPIC"], [p.read_bytes() for p, _ in photos])
        truth = {s.event_id: sku for s, (_, sku) in zip(sent, photos, strict=True)}
        records = await read_until(broker.bootstrap, names["SHELFMATCH_OUTPUT_TOPIC"],
                                   lambda rs: len(rs) >= len(sent), timeout_s=180)
        assert records, log.read_text()
        events = [MatchEvent.model_validate_json(r.value) for r in records]
        matched = [e for e in events if e.verdict == "match"]
        right = sum(e.best.sku == truth[e.event_id] for e in matched)
        assert len(matched) >= len(events) // 2, [e.verdict for e in events]  # not mostly 'unknown'
        assert right >= 0.9 * len(matched)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=120)
    assert service.returncode == 0, log.read_text()

    after = bash([*setup, *lines[consume + 1:]], timeout=900)
    assert after.returncode == 0, after.stdout + after.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())  # strict JSON: no NaN
    assert {m["method"] for m in report["methods"]} >= {"histogram", "phash"}
    assert (tmp_path / "catalog-head.safetensors").is_file()


def test_an_uncalibrated_catalogue_asks_for_calibration_instead_of_guessing(broker, tmp_path):
    env = base_env(broker)
    assert shelfmatch("catalog", "build", "--images", str(REFERENCES), "--model", "efficientnet_lite0", "--device",
                      "cpu", "--out", "raw.safetensors", env=env, cwd=tmp_path).returncode == 0
    result = shelfmatch("consume", env={**env, "SHELFMATCH_CATALOG": "raw.safetensors"}, cwd=tmp_path)
    assert_one_clear_line(result, "not calibrated", "shelfmatch catalog calibrate", "SHELFMATCH_THRESHOLD")


def test_a_catalogue_built_from_a_relative_folder_still_works_after_a_cd(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "refs").symlink_to(REFERENCES, target_is_directory=True)
    env = {**os.environ, "SHELFMATCH_DEVICE": "cpu"}
    assert shelfmatch("catalog", "build", "--images", "../refs", "--model", "efficientnet_lite0", "--device", "cpu",
                      "--out", "../cat/c.safetensors", env=env, cwd=tmp_path / "work").returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = shelfmatch("eval", "--catalog", str(tmp_path / "cat" / "c.safetensors"), "--queries", str(PHOTOS),
                        "--methods", "histogram", "--device", "cpu", env=env, cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "histogram" in result.stdout


def test_a_wrong_bootstrap_address_names_the_setting_before_loading_the_model(tmp_path, calibrated):
    port = free_port()  # nothing listens there
    env = {**os.environ, "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
           "SHELFMATCH_CATALOG": str(calibrated), "SHELFMATCH_DEVICE": "cpu"}
    result = shelfmatch("consume", env=env, cwd=tmp_path, timeout_s=120)
    assert_one_clear_line(result, "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{port}")
    assert "products" not in result.stderr  # the catalogue's model was never loaded


def test_a_metrics_port_in_use_names_the_setting(broker, tmp_path, calibrated):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = base_env(broker, SHELFMATCH_CATALOG=str(calibrated), SHELFMATCH_METRICS_PORT=str(taken.getsockname()[1]))
        result = shelfmatch("consume", env=env, cwd=tmp_path)
    assert_one_clear_line(result, "SHELFMATCH_METRICS_PORT")


def test_an_invalid_setting_is_named_as_the_variable_and_a_misspelt_one_is_warned_about(broker, tmp_path):
    env = base_env(broker, SHELFMATCH_BATCH_SIZE="zero", SHELFMATCH_BACTH_SIZE="8")
    result = shelfmatch("consume", env=env, cwd=tmp_path)
    assert_one_clear_line(result, "SHELFMATCH_BATCH_SIZE", "--batch-size", "'zero'")
    assert "SHELFMATCH_BACTH_SIZE is not a shelfmatch setting" in result.stderr


async def test_a_misspelt_input_topic_is_not_ready_and_is_named_until_it_exists(broker, tmp_path, calibrated):
    topic, out, dlq = unique("not-yet"), unique("out"), unique("dlq")
    await create_topics(broker.bootstrap, out, dlq)
    env = base_env(broker, SHELFMATCH_CATALOG=str(calibrated), SHELFMATCH_INPUT_TOPIC=topic,
                   SHELFMATCH_OUTPUT_TOPIC=out, SHELFMATCH_DLQ_TOPIC=dlq, SHELFMATCH_GROUP_ID=unique("g"))
    log = tmp_path / "service.log"
    proc = consume(env, tmp_path, log)
    port = env["SHELFMATCH_METRICS_PORT"]

    def readyz() -> int | None:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    try:
        deadline = time.monotonic() + 120
        while f"input topic {topic} does not exist" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            await asyncio.sleep(0.2)
        assert readyz() == 503
        await create_topics(broker.bootstrap, topic)
        created = time.monotonic()
        while readyz() != 200:
            assert time.monotonic() - created < 45, log.read_text()  # metadata refresh is 10 s, not 5 min
            await asyncio.sleep(0.2)
        sent = await produce(broker.bootstrap, topic, [store_photos()[0][0].read_bytes()])
        await read_until(broker.bootstrap, out, lambda rs: len(rs) >= len(sent), timeout_s=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    text = log.read_text()
    assert text.count(f"input topic {topic} does not exist") == 1  # said once, not on every poll
    assert f"input topic {topic} found" in text


async def test_a_missing_output_topic_is_named_once_and_aiokafka_does_not_flood_the_log(broker, tmp_path, calibrated):
    topic, missing, dlq = unique("in"), unique("missing-out"), unique("dlq")
    await create_topics(broker.bootstrap, topic, dlq)
    await produce(broker.bootstrap, topic, [store_photos()[0][0].read_bytes()])
    env = base_env(broker, SHELFMATCH_CATALOG=str(calibrated), SHELFMATCH_INPUT_TOPIC=topic,
                   SHELFMATCH_OUTPUT_TOPIC=missing, SHELFMATCH_DLQ_TOPIC=dlq, SHELFMATCH_GROUP_ID=unique("g"),
                   SHELFMATCH_PUBLISH_TIMEOUT_MS="2000")
    log = tmp_path / "service.log"
    proc = consume(env, tmp_path, log)
    try:
        deadline = time.monotonic() + 120
        while log.read_text().count(f"to {missing} failed") < 3:  # several publish attempts have failed
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    lines = log.read_text().splitlines()
    library_noise = [line for line in lines if " aiokafka" in line and (" ERROR " in line or " WARNING " in line)]
    assert len(library_noise) <= 5, "\n".join(library_noise[:20])


def test_topics_create_makes_the_three_topics_once(broker, tmp_path):
    names = {"SHELFMATCH_INPUT_TOPIC": unique("in"), "SHELFMATCH_OUTPUT_TOPIC": unique("out"),
             "SHELFMATCH_DLQ_TOPIC": unique("dlq")}
    env = base_env(broker, **names)
    first = shelfmatch("topics", "create", "--partitions", "2", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created") == 3 and "2 partition(s)" in first.stdout
    again = shelfmatch("topics", "create", env=env, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("exists, left as it is") == 3
