from datetime import UTC, datetime

import pytest

from catalog.errors import ImageRejected
from consumer.messages import MatchEvent, dead_letter_headers, parse_headers


def test_known_headers_are_read_and_key_is_the_default_camera():
    fields = parse_headers(b"cam-7", [
        ("store-id", b"store-12"), ("shelf-id", b"aisle-3/bay-2"), ("captured-at", b"2026-11-27T08:15:00Z"),
        ("content-type", b"image/jpeg"), ("x-other", b"\xff\xfe"),  # unknown headers are ignored, even binary
    ])
    assert fields["key"] == "cam-7" and fields["camera_id"] == "cam-7"
    assert fields["store_id"] == "store-12" and fields["shelf_id"] == "aisle-3/bay-2"
    assert fields["captured_at"] == datetime(2026, 11, 27, 8, 15, tzinfo=UTC)


def test_camera_header_wins_over_the_key():
    assert parse_headers(b"key-cam", [("camera-id", b"header-cam")])["camera_id"] == "header-cam"


@pytest.mark.parametrize(
    "key,headers",
    [
        (b"\xff\xfe", []),
        (None, [("store-id", b"\xc3\x28")]),
        (None, [("captured-at", b"yesterday")]),
        (None, [("captured-at", b"2026-11-27T08:15:00")]),  # no offset: ambiguous instant
    ],
    ids=["key-not-utf8", "header-not-utf8", "timestamp-garbage", "timestamp-naive"],
)
def test_malformed_headers_are_bad_header(key, headers):
    with pytest.raises(ImageRejected) as info:
        parse_headers(key, headers)
    assert info.value.reason == "bad-header"


def test_dead_letter_headers_keep_the_originals_and_add_context():
    hdrs = dead_letter_headers([("camera-id", b"c1")], reason="corrupt-image", error="broken", topic="t",
                               partition=2, offset=41)
    assert hdrs[0] == ("camera-id", b"c1")
    d = dict(hdrs)
    assert d["dlq-reason"] == b"corrupt-image" and d["dlq-error"] == b"broken"
    assert (d["dlq-source-topic"], d["dlq-source-partition"], d["dlq-source-offset"]) == (b"t", b"2", b"41")


def test_event_schema_has_the_contract_fields():
    schema = MatchEvent.model_json_schema()
    for field in ("schema_version", "event_id", "source", "photo", "catalog", "verdict", "best", "candidates",
                  "threshold", "latency_ms"):
        assert field in schema["required"] or field in schema["properties"]
    assert set(schema["properties"]["verdict"]["enum"]) == {"match", "ambiguous", "unknown"}


def test_a_repeated_header_counts_with_its_last_value():
    fields = parse_headers(None, [("camera-id", b"first"), ("store-id", b"s1"), ("camera-id", b"last")])
    assert fields["camera_id"] == "last" and fields["store_id"] == "s1"


@pytest.mark.parametrize("key,headers", [
    (b"k" * 1025, []),
    (None, [("camera-id", b"c" * 1025)]),
], ids=["long-key", "long-known-header"])
def test_a_key_or_read_header_over_1_kib_is_a_bad_header(key, headers):
    with pytest.raises(ImageRejected) as info:
        parse_headers(key, headers)
    assert info.value.reason == "bad-header" and "over 1024" in str(info.value)


def test_a_large_binary_header_under_another_name_is_not_read():
    fields = parse_headers(b"k" * 1024, [("x-trace", b"\xff" * 1_048_576), ("camera-id", b"c" * 1024)])
    assert fields["key"] == "k" * 1024 and fields["camera_id"] == "c" * 1024
