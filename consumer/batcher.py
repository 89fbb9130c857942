"""Size-or-timeout micro-batches.

A batch closes when it holds ``max_size`` items or ``max_wait_s`` after its first item arrived,
whichever comes first. The remaining wait is recomputed on every loop, items already queued are
taken even after the deadline (a backlog never produces tiny batches), and every batch holds at
least one item. ``max_wait_s = 0`` means "take what is already there", not "no batching".
"""
from __future__ import annotations

import asyncio
import time
from typing import TypeVar

from consumer.stream import END, EndOfStream

T = TypeVar("T")


async def batches(
    inq: asyncio.Queue[T | EndOfStream], outq: asyncio.Queue[list[T] | EndOfStream], *, max_size: int,
    max_wait_s: float,
) -> None:
    """Stage 2: group items from ``inq`` into lists on ``outq``; forward END after a final flush."""
    while True:
        first = await inq.get()
        if isinstance(first, EndOfStream):
            await outq.put(END)
            return
        batch: list[T] = [first]
        deadline = time.monotonic() + max_wait_s
        ended = False
        while len(batch) < max_size:
            if not inq.empty():
                item = inq.get_nowait()
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(inq.get(), remaining)
                except TimeoutError:
                    break
            if isinstance(item, EndOfStream):
                ended = True
                break
            batch.append(item)
        await outq.put(batch)
        if ended:
            await outq.put(END)
            return
