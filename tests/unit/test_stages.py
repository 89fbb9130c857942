"""The decode stages on their own, without a broker: what a batch keeps in memory on its way."""
import asyncio
from concurrent.futures import ThreadPoolExecutor

from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from catalog.preprocess import DecodeLimits
from consumer.metrics import Metrics
from consumer.pipeline import finish_decoding
from consumer.source import DecodedPhoto, Poison, Received, decode_record
from consumer.stream import END
from tests import photos as P


def record(offset: int, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(topic="photos", partition=0, offset=offset, timestamp=0, timestamp_type=0, key=b"k",
                          value=value, checksum=None, serialized_key_size=1, serialized_value_size=len(value),
                          headers=[])


async def test_a_decoded_batch_keeps_only_the_bytes_its_dead_letters_need():
    path, _ = P.store_photos()[0]
    good, bad = P.encode(P.photo(path), "JPEG", quality=90), P.random_bytes()
    loop = asyncio.get_running_loop()
    inq, outq = asyncio.Queue(), asyncio.Queue()
    with ThreadPoolExecutor(2) as pool:
        batch = [
            Received(record=rec, arrived=0.0,
                     decoded=loop.run_in_executor(pool, decode_record, rec, (224, 224), DecodeLimits()))
            for rec in (record(0, good), record(1, bad))
        ]
        await inq.put(batch)
        await inq.put(END)
        await finish_decoding(inq, outq, recognizer=None, device_pool=pool, limits=DecodeLimits(),
                              metrics=Metrics(CollectorRegistry()))
    ready = await outq.get()
    out, decoded = ready.received, ready.decoded
    assert await outq.get() is END
    assert isinstance(decoded[0], DecodedPhoto) and decoded[0].pixels.shape == (3, 224, 224)
    assert isinstance(decoded[1], Poison)
    assert out[0].record.value is None and out[0].record.offset == 0 and out[0].record.key == b"k"
    assert out[1].record.value == bad  # the dead letter carries the original bytes


def test_an_unexpected_decoder_error_becomes_a_dead_letter_not_a_crash(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr("consumer.source.decode", broken)
    path, _ = P.store_photos()[0]
    result = decode_record(record(0, P.encode(P.photo(path), "JPEG", quality=90)), (224, 224), DecodeLimits())
    assert isinstance(result, Poison)
    assert result.reason == "corrupt-image" and "RuntimeError: decoder bug" in result.error
