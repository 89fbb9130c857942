"""What every queue between the stages shares: the end-of-stream marker and the queue depths.

Each stage reads one bounded queue and writes the next (see :mod:`consumer.pipeline`). When its
input ends, a stage flushes what it holds, puts :data:`END` on its output and returns, so shutdown
travels down the pipeline in order. Depths are small on purpose: a slow stage holds the ones before
it back, and a backlog stays in Kafka instead of in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Final


class EndOfStream:
    """The type of :data:`END`; there is one instance, compared with ``is``."""

    _instance: EndOfStream | None = None

    def __new__(cls) -> EndOfStream:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "END"


END: Final = EndOfStream()


@dataclass(frozen=True)
class QueueDepths:
    """How many items each queue holds before its writer waits. Benchmarks and tests import
    :data:`QUEUE_DEPTHS` rather than repeating these numbers."""

    fetched_batches: int = 2  # fetched records, in batches' worth (x batch size): decoding runs ahead
    batched: int = 2  # batches formed, waiting for their decodes to finish
    ready: int = 1  # decoded batches waiting for the model: one is decoded while another is embedded
    # input batches cut into units (photos or facings) and not yet all matched, inside stage 4
    # (consumer.recognize): enough for the units queue (fetched x batch size), one model batch
    # waiting and one embedded to come from different input batches
    recognizing: int = 4
    processed: int = 2  # batches matched, waiting to be sent
    sent: int = 4  # batches sent, waiting for acknowledgements and their commit

    def fetched(self, batch_size: int) -> int:
        return self.fetched_batches * batch_size

    def photos_in_flight(self, batch_size: int) -> int:
        """The most photos fetched but not yet committed: every queue full, and each of the six
        stages after fetch holding one batch while it waits to put it on. A consumer killed
        mid-stream re-publishes at most this many photos after its restart."""
        holding = 6  # batches, finish_decoding, cut and assemble (stage 4), publish, commit_in_order
        queued = self.fetched_batches + self.batched + self.ready + self.recognizing + self.processed + self.sent
        return batch_size * (queued + holding)


QUEUE_DEPTHS: Final = QueueDepths()
