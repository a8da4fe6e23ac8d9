"""``gpl kafka fetch``: Apache Kafka's broker jars from Maven Central, once (runtime/kafka_dist.py).

Why a command: ``make setup`` runs it where Java and Maven are installed, so ``gpl up --broker kafka`` and
the test suite start the broker without a network; the embedded default never needs it.
"""

from __future__ import annotations

import argparse
import sys

from runtime.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    kp = sub.add_parser("kafka", help="Apache Kafka for `--broker kafka`",
                        description=__doc__).add_subparsers(metavar="ACTION")
    f = kp.add_parser("fetch", help="fetch the broker's jars with Maven into data_dir/kafka (needs Java 17+, mvn)",
                      description="Copy the pinned Apache Kafka broker and its dependencies (deploy/kafka/pom.xml) "
                                  "into <data_dir>/kafka/<version>/lib; a finished copy is not fetched again.")
    f.add_argument("--if-available", action="store_true",
                   help="do nothing (exit 0) when Java or Maven is missing: the embedded default needs neither")
    f.set_defaults(run=run_fetch)


def run_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.kafka_dist import KAFKA_VERSION, KafkaUnavailable, ensure, fetched

    was = fetched(settings.data_dir)
    try:
        java, lib = ensure(settings.data_dir)
    except KafkaUnavailable as e:
        if args.if_available:
            print(f"gpl kafka fetch: skipped: {e}", file=sys.stderr)
            return 0
        raise
    print(f"kafka {KAFKA_VERSION}: {lib} ({'already there' if was else 'fetched'}; runs with {java})")
    return 0
