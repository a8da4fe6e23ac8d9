"""A faust transport whose consumer waits at most ``fetch_wait_max_ms`` for data.

faust 0.15 builds its aiokafka consumer with a hard-coded ``fetch_max_wait_ms=1500``. The embedded
Tansu broker holds a fetch for the whole wait when no data is there at the time it is asked, so every
hop through the streams processor cost up to 1.5 s of latency. This transport is the stock aiokafka
one with only that number taken from the settings; it is registered as the ``gplkafka://`` scheme.
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as driver

SCHEME = "gplkafka"


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # read by AIOKafkaConsumer.start() when it builds its fetcher
        consumer._fetch_max_wait_ms = int(getattr(self.app, "gpl_fetch_wait_max_ms", 1500))
        return consumer


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = _Consumer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
