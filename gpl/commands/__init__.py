"""Every ``gpl`` command, one module per command (or per pair sharing one code path: ``up`` and ``run``).

One convention, so that adding a command means writing one module and naming it in :data:`COMMANDS`:

* ``register(sub)`` adds the module's parser(s) to the ``gpl`` sub-parsers, with their help texts;
* each runnable (sub)command sets its handler with ``set_defaults(run=handler)`` (and
  ``serves_metrics=True`` when it runs stages, so ``/metrics`` and the probes are served);
* a handler is ``handler(args, settings) -> int``, the exit status; it is ``run`` in a module of one
  command, ``run_<action>`` where a command has actions (``gpl dlq show``: ``run_show``); failures the
  operator can fix raise :class:`gpl.oneline.OperatorError` and reach the terminal as one line;
* heavy imports (the clients, torch, the stages) stay inside the handlers, so building the parser stays
  light and ``gpl --version`` (gpl/cli.py) imports none of them.

gpl/cli.py is only the entry point: it builds the parser from :data:`COMMANDS`, loads the settings and
dispatches to ``args.run``. This module stays light too: every command module imports it.
"""

from __future__ import annotations

import sys

# in the order `gpl --help` lists them; each module's register() may add more than one command
COMMANDS = ("demo", "up", "replay", "models", "config", "bench", "eval", "sid", "calibrate", "export", "publish",
            "schemas", "dlq", "topics", "kafka", "space", "groups")

BROKER_HELP = ("the local broker to start: embedded (Tansu, from PyPI) or kafka (Apache Kafka; needs Java 17+ "
               "and Maven, `gpl kafka fetch`) (default: broker.kind, embedded)")


def progress() -> bool:
    """Progress bars only when a person watches: stderr is a terminal (not a pipe or a service log)."""
    return sys.stderr.isatty()
