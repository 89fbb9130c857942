"""bench/report.py rewrites docs/performance.md from the benchmark outputs present: a regeneration
replaces the sections it generated and keeps, in place, those it did not."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import report


def test_a_regeneration_replaces_its_sections_and_keeps_the_others_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text("\n".join([
        "# Performance", "", "old preamble", "",
        "## End to end", "", "old e2e table", "",
        "## Cost of exactly-once", "", "kept: its output is absent here", "",
        "## GPU", "", "old gpu", "",
        "## Facings", "", "kept: written from another bench", "",
    ]))
    monkeypatch.setattr(report, "DOC", doc)
    generated = ["# Performance", "", "new preamble", "", "## End to end", "", "new e2e table", "",
                 "## GPU", "", "new gpu", "", "## Brand new", "", "appended", ""]

    lines = report.merged(generated)

    titles = [ln for ln in lines if ln.startswith("## ")]
    assert titles == ["## End to end", "## Cost of exactly-once", "## GPU", "## Facings", "## Brand new"]
    text = "\n".join(lines)
    assert "new preamble" in text and "old preamble" not in text
    assert "new e2e table" in text and "old e2e table" not in text
    assert "new gpu" in text and "old gpu" not in text
    assert "kept: its output is absent here" in text and "kept: written from another bench" in text


def test_without_an_existing_report_it_is_the_generated_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "DOC", tmp_path / "absent.md")
    generated = ["# Performance", "", "## End to end", "", "table", ""]
    assert report.merged(generated) == generated


def test_merging_the_real_report_again_changes_nothing_and_ends_with_a_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report in docs/ merged with only its own preamble regenerated: every section stays, in
    order, once; written twice, the same bytes."""
    real = report.DOC.read_text()
    doc = tmp_path / "performance.md"
    doc.write_text(real)
    monkeypatch.setattr(report, "DOC", doc)
    head, before = report.sections(real.splitlines())
    once = "\n".join(report.merged(head)).rstrip("\n") + "\n"
    doc.write_text(once)
    twice = "\n".join(report.merged(head)).rstrip("\n") + "\n"
    assert once == twice and once.endswith("\n") and not once.endswith("\n\n")
    assert list(report.sections(once.splitlines())[1]) == list(before)
    assert len(before) >= 5, list(before)


def test_a_title_inside_a_code_block_is_not_a_section() -> None:
    _, by_title = report.sections(["## A", "```", "## not a title", "```", "## B", "text"])
    assert list(by_title) == ["## A", "## B"]


def _row(model: str, size: str, execution: str, service: float, alone: float, rss: float, p99: float) -> dict:
    name, _, precision = execution.partition(":")
    return {"model": model, "size": size, "execution": name, "precision": precision or "auto", "service_img_s": service,
            "model_alone_img_s": alone, "naive_img_s": 10.0, "service_peak_rss_mb": rss, "batch_service_s": 0.1,
            "loads": [{"fraction": 0.5, "p99_ms": p99}]}


def test_the_cpu_runtime_targets_are_read_off_the_rows_of_the_run() -> None:
    results = [
        _row("efficientnet_lite0", "store", "eager", 50, 45, 1400, 100),
        _row("efficientnet_lite0", "store", "openvino:bf16", 250, 260, 1200, 300),  # 5x eager, 96% of alone
        _row("efficientnet_lite0", "store", "openvino:fp32", 150, 200, 1500, 900),  # 75% of alone; RSS over eager
    ]
    lines = report.cpu_runtime_targets(results)
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines if ln.startswith("| ") and "---" not in ln}
    assert rows["store photos: Lite0 >= 4x today's service (its default here)"].endswith("| 5.00x (bf16) | met |")
    assert "efficientnet_lite0 fp32 75%" in rows["store photos: each >= 90% of its backend alone"]
    assert rows["store photos: each >= 90% of its backend alone"].endswith("| missed |")
    # bound: 50 ms wait + 3 x 100 ms batch = 350 ms: bf16 met (300), fp32 missed (900)
    latency = rows["p99 at 50% load within max wait + 3 x batch"]
    assert "met: efficientnet_lite0 store bf16; missed: efficientnet_lite0 store fp32" in latency
    rss = rows["peak RSS not above today's (eager's, same model and photos)"]
    assert "efficientnet_lite0 store fp32, 1,500 against 1,400 MB" in rss and rss.endswith("| missed |")
    assert rows["store photos: ResNet-18 >= 2.2x"].endswith("| - |")  # no ResNet rows in this run


def test_the_targets_read_auto_precision_as_the_default_and_no_rows_as_unknown() -> None:
    """bench/e2e.py's own default runs `openvino` at auto precision (bf16 here): that row is
    Lite0's default; a target with no rows in the run is '-', never 'missed'."""
    results = [
        _row("efficientnet_lite0", "store", "eager", 50, 45, 1400, 100),
        _row("efficientnet_lite0", "store", "openvino", 250, 260, 1200, 300),
        _row("efficientnet_lite0", "store", "openvino:fp32", 150, 160, 1300, 300),
    ]
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in report.cpu_runtime_targets(results)
            if ln.startswith("| ") and "---" not in ln}
    assert rows["store photos: Lite0 >= 4x today's service (its default here)"].endswith("| 5.00x (bf16) | met |")
    assert rows[">= 3x the naive consumer (defaults, store photos)"].endswith("| efficientnet_lite0 25.0x | met |")
    assert rows["fp32 forced: Lite0 >= 2.5x, ResNet-18 >= 1.25x"].endswith("| 3.00x, - | - |")


def test_an_auto_row_says_what_auto_resolved_to_and_is_lite0s_default_either_way() -> None:
    """On a CPU where bf16 measured slower, `openvino` at auto runs fp32, and that is Lite0's default."""
    slow_bf16 = {**_row("efficientnet_lite0", "store", "openvino", 250, 260, 1200, 300), "resolved_precision": "fp32"}
    results = [_row("efficientnet_lite0", "store", "eager", 50, 45, 1400, 100), slow_bf16]
    assert report._execution(slow_bf16) == "openvino (auto: fp32)"
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in report.cpu_runtime_targets(results)
            if ln.startswith("| ") and "---" not in ln}
    assert rows["store photos: Lite0 >= 4x today's service (its default here)"].endswith("| 5.00x (fp32) | met |")
    fast_bf16 = {**slow_bf16, "resolved_precision": "bf16"}
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in report.cpu_runtime_targets([results[0], fast_bf16])
            if ln.startswith("| ") and "---" not in ln}
    assert rows["store photos: Lite0 >= 4x today's service (its default here)"].endswith("| 5.00x (bf16) | met |")


def test_the_drain_rate_leaves_out_the_first_batch_whose_end_opens_the_window() -> None:
    """Events leave in bursts, one per batch: 8 batches of 32, one every 100 ms, are 320 photos/s,
    not the 364 that all 256 events over the 700 ms from the first to the last would give; that
    holds when a batch's events leave in 3 transactions, 15 ms apart (exactly-once)."""
    from types import SimpleNamespace

    from bench.e2e import rate_of

    bursts = [SimpleNamespace(timestamp=1_000 + 100 * b + i % 3) for b in range(8) for i in range(32)]
    assert rate_of(bursts) == pytest.approx(320, rel=0.01)  # 224 photos in 702 ms: each burst takes 2 ms
    per_partition = [SimpleNamespace(timestamp=1_000 + 100 * b + 15 * (i % 3)) for b in range(8) for i in range(32)]
    assert rate_of(per_partition) == pytest.approx(320, rel=0.05)  # 224 photos in 730 ms
    one_at_a_time = [SimpleNamespace(timestamp=1_000 + 40 * i) for i in range(11)]  # the naive consumer
    assert rate_of(one_at_a_time, first=1) == pytest.approx(25, rel=1e-6)
    with pytest.raises(ValueError, match="no rate"):
        rate_of(bursts[:32])
