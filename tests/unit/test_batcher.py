import asyncio
import time

from consumer.batcher import batches
from consumer.stream import END


async def run(items, *, max_size, max_wait_s, feed_delay_s=0.0):
    inq, outq = asyncio.Queue(), asyncio.Queue()

    async def feed():
        for item in items:
            await inq.put(item)
            if feed_delay_s:
                await asyncio.sleep(feed_delay_s)  # a slow producer, not synchronisation
        await inq.put(END)

    await asyncio.gather(feed(), batches(inq, outq, max_size=max_size, max_wait_s=max_wait_s))
    out = []
    while (b := outq.get_nowait()) is not END:
        out.append(b)
    return out


async def test_a_backlog_fills_whole_batches_without_waiting():
    start = time.monotonic()
    out = await run(list(range(70)), max_size=32, max_wait_s=5.0)
    assert [len(b) for b in out] == [32, 32, 6]
    assert [x for b in out for x in b] == list(range(70))  # order kept
    assert time.monotonic() - start < 1.0  # END flushed the last partial batch at once


async def test_a_trickle_closes_batches_on_the_deadline():
    out = await run(list(range(6)), max_size=32, max_wait_s=0.05, feed_delay_s=0.03)
    assert sum(len(b) for b in out) == 6
    assert 1 < len(out) < 6  # neither one batch for everything nor one per item
    assert all(b for b in out)


async def test_zero_wait_still_batches_what_is_already_queued():
    out = await run(list(range(10)), max_size=4, max_wait_s=0.0)
    assert [len(b) for b in out] == [4, 4, 2]


async def test_end_on_an_empty_queue_produces_no_empty_batch():
    assert await run([], max_size=4, max_wait_s=0.1) == []
