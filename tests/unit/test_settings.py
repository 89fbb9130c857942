import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from consumer.app import tls_context
from consumer.cli import parser
from consumer.errors import ConfigurationError
from consumer.settings import Settings


def test_defaults_follow_the_wire_contract(monkeypatch):
    for var in [v for v in __import__("os").environ if v.startswith("SHELFMATCH_")]:
        monkeypatch.delenv(var)
    s = Settings()
    assert (s.input_topic, s.output_topic, s.dlq_topic) == ("shelf.photos", "shelf.matches", "shelf.photos.dlq")
    assert (s.batch_size, s.top_k, s.device) == (32, 5, "auto")
    assert s.allowed_formats == ("JPEG", "PNG", "WEBP")


def test_environment_variables_with_prefix_are_read(monkeypatch):
    monkeypatch.setenv("SHELFMATCH_BATCH_SIZE", "8")
    monkeypatch.setenv("SHELFMATCH_THRESHOLD", "0.9")
    monkeypatch.setenv("SHELFMATCH_ALLOWED_FORMATS", "jpeg, png")
    monkeypatch.setenv("SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS", "broker-1:9092,broker-2:9092")
    s = Settings()
    assert s.batch_size == 8 and s.threshold == 0.9
    assert s.allowed_formats == ("JPEG", "PNG")
    assert s.kafka_bootstrap_servers == "broker-1:9092,broker-2:9092"


def test_cli_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("SHELFMATCH_BATCH_SIZE", "8")
    args = parser().parse_args(["consume", "--batch-size", "16", "--device", "cpu"])
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    s = Settings(**overrides)
    assert s.batch_size == 16 and s.device == "cpu"


def test_every_setting_has_a_flag():
    help_text = parser()._subparsers._group_actions[0].choices["consume"].format_help()
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"SHELFMATCH_{name.upper()}" in help_text


@pytest.mark.parametrize(
    "env,message",
    [
        ({"SHELFMATCH_BATCH_SIZE": "0"}, "batch_size"),
        ({"SHELFMATCH_DEVICE": "tpu"}, "device"),
        ({"SHELFMATCH_THRESHOLD": "1.5"}, "threshold"),
        ({"SHELFMATCH_ALLOWED_FORMATS": "JPEG,EPS"}, "allowed formats"),
        ({"SHELFMATCH_OUTPUT_TOPIC": "shelf.photos"}, "must all differ"),
        ({"SHELFMATCH_SECURITY_PROTOCOL": "SASL_SSL"}, "SASL_PASSWORD"),
        ({"SHELFMATCH_SECURITY_PROTOCOL": "SSL", "SHELFMATCH_SSL_CERTFILE": "/c/tls.crt"}, "SSL_KEYFILE"),
        ({"SHELFMATCH_SECURITY_PROTOCOL": "SSL", "SHELFMATCH_SSL_KEYFILE": "/c/tls.key"}, "SSL_CERTFILE"),
        ({"SHELFMATCH_SSL_CERTFILE": "/c/tls.crt", "SHELFMATCH_SSL_KEYFILE": "/c/tls.key"}, "only sent over TLS"),
        ({"SHELFMATCH_NOT_A_SETTING": "1"}, None),  # unknown variables are ignored, not fatal
    ],
)
def test_invalid_settings_are_rejected_with_the_field_named(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if message is None:
        Settings()
        return
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_password_is_never_shown(monkeypatch):
    monkeypatch.setenv("SHELFMATCH_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SHELFMATCH_SASL_USERNAME", "shelfmatch")
    monkeypatch.setenv("SHELFMATCH_SASL_PASSWORD", "hunter2-very-secret")
    s = Settings()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())
    assert s.sasl_password.get_secret_value() == "hunter2-very-secret"


def test_readme_documents_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`SHELFMATCH_{name.upper()}`" in readme


def _cgroup(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_available_cpus_follow_the_container_quota_not_the_node(tmp_path):
    import os

    from consumer.settings import available_cpus

    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(_cgroup(tmp_path / "v2", {"cpu.max": "50000 100000\n"})) == 1  # half a CPU: one thread
    assert available_cpus(_cgroup(tmp_path / "v2max", {"cpu.max": "max 100000\n"})) == affinity
    assert available_cpus(_cgroup(tmp_path / "v1", {"cpu/cpu.cfs_quota_us": "100000\n",
                                                    "cpu/cpu.cfs_period_us": "100000\n"})) == 1
    assert available_cpus(_cgroup(tmp_path / "v1none", {"cpu/cpu.cfs_quota_us": "-1\n",
                                                        "cpu/cpu.cfs_period_us": "100000\n"})) == affinity
    assert available_cpus(tmp_path / "nothing") == affinity
    big = 1000 * 100000
    assert available_cpus(_cgroup(tmp_path / "big", {"cpu.max": f"{big} 100000\n"})) == affinity  # never above affinity


def test_output_compression_defaults_to_zstd_and_none_means_uncompressed(monkeypatch):
    monkeypatch.delenv("SHELFMATCH_COMPRESSION", raising=False)
    assert Settings().compression_type == "zstd"  # measured in bench/compression.py
    monkeypatch.setenv("SHELFMATCH_COMPRESSION", "none")
    assert Settings().compression_type is None
    monkeypatch.setenv("SHELFMATCH_COMPRESSION", "brotli")
    with pytest.raises(ValidationError, match="compression"):
        Settings()


def test_every_option_of_every_command_says_what_it_is():
    import argparse

    from consumer.cli import parser

    def walk(p: argparse.ArgumentParser, name: str):
        for action in p._actions:  # argparse has no public listing of a parser's options
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")
            elif action.option_strings and action.dest != "help":
                yield f"{name} {action.option_strings[-1]}", action.help

    empty = [option for option, text in walk(parser(), "shelfmatch") if not text]
    assert empty == []


def test_misspelt_variables_are_found_and_tooling_ones_are_not(monkeypatch):
    from consumer.settings import explain, unknown_variables

    env = {"SHELFMATCH_BATCH_SIZE": "8", "SHELFMATCH_BACTH_SIZE": "8", "SHELFMATCH_KAFKA_STATE": "x", "PATH": "/"}
    assert unknown_variables(env) == ["SHELFMATCH_BACTH_SIZE"]
    with pytest.raises(ValidationError) as caught:
        Settings(batch_size="zero")
    assert explain(caught.value).startswith("SHELFMATCH_BATCH_SIZE (--batch-size): ")


def test_aiokafka_lines_about_what_the_service_reports_itself_are_lowered_to_debug():
    import logging

    from consumer.logs import LowerReported

    def record(name: str, level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, (), None)

    noisy = record("aiokafka.consumer.group_coordinator", logging.ERROR,
                   "Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError")
    assert LowerReported().filter(noisy) is False and noisy.levelname == "DEBUG"
    other = record("aiokafka.conn", logging.ERROR, "Unable to connect")
    assert LowerReported().filter(other) is True and other.levelno == logging.ERROR
    ours = record("consumer.app", logging.WARNING, "input topic x not found in cluster metadata")
    assert LowerReported().filter(ours) is True and ours.levelno == logging.WARNING


@pytest.mark.parametrize("broken", ["missing", "not-pem"])
def test_unreadable_tls_files_are_a_configuration_error_that_names_them(tmp_path, broken):
    cert = tmp_path / "tls.crt"
    if broken == "not-pem":
        cert.write_text("this is not a certificate\n")
    settings = Settings(security_protocol="SSL", ssl_certfile=cert, ssl_keyfile=tmp_path / "tls.key")
    with pytest.raises(ConfigurationError, match="SHELFMATCH_SSL_CERTFILE=.*tls.crt"):
        tls_context(settings)


def test_without_a_cpu_limit_the_pods_cpu_request_sizes_the_threads(tmp_path):
    """No quota (no CPU limit): the downward API's request, rounded up, caps the threads instead
    of the node's cores; a quota still wins over the request; 0 (no request) means unknown."""
    import os

    from consumer.settings import available_cpus

    affinity = len(os.sched_getaffinity(0))
    unlimited = _cgroup(tmp_path / "max", {"cpu.max": "max 100000\n"})
    assert available_cpus(unlimited, request_millicores=500) == 1
    assert available_cpus(unlimited, request_millicores=1001) == min(2, affinity)
    assert available_cpus(unlimited, request_millicores=0) == affinity
    assert available_cpus(unlimited, request_millicores=10_000_000) == affinity  # never above affinity
    assert available_cpus(tmp_path / "no-cgroup", request_millicores=1000) == 1
    limited = _cgroup(tmp_path / "quota", {"cpu.max": "100000 100000\n"})
    assert available_cpus(limited, request_millicores=64_000) == 1  # the limit is what the pod can use


def test_the_cpu_request_sets_the_default_decode_workers_and_an_explicit_value_wins():
    from consumer.settings import available_cpus

    assert Settings(cpu_request_millicores=1000).decode_workers == available_cpus(request_millicores=1000)
    assert Settings(cpu_request_millicores=1000, decode_workers=3).decode_workers == 3


def test_the_heartbeat_is_3_s_but_at_most_a_third_of_the_session():
    assert Settings().heartbeat_interval == 3_000
    assert Settings(session_timeout_ms=6_000).heartbeat_interval == 2_000


def test_the_rebalance_timeout_exceeds_the_drain():
    assert Settings().rebalance_timeout == 60_000  # drain 30 s + 30 s
    assert Settings(shutdown_timeout_s=90).rebalance_timeout == 120_000
    assert Settings(rebalance_timeout_ms=45_000).rebalance_timeout == 45_000
    with pytest.raises(ValidationError, match="REBALANCE_TIMEOUT_MS"):
        Settings(rebalance_timeout_ms=30_000, shutdown_timeout_s=30)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from Linux's /proc")
def test_the_worker_threads_carry_their_names_to_the_os():
    from consumer.app import Pools

    def os_name() -> str:
        return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    pools = Pools.create(decode_workers=2)
    try:
        names = {pool: getattr(pools, pool).submit(os_name).result(timeout=10)
                 for pool in ("decode", "model", "device_decode", "catalog")}
    finally:
        for pool in (pools.decode, pools.model, pools.device_decode, pools.catalog):
            pool.shutdown()
    assert names == {"decode": "decode_0", "model": "model_0", "device_decode": "device-decode_0",
                     "catalog": "catalog_0"}
    assert os_name() != "decode_0", "the calling thread keeps its own name"
