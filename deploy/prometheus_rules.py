"""Write deploy/prometheus-rules.yml, the one-host Prometheus's rule file, from deploy/base/alerts.yaml.

Why a generated copy: the alerts are written once, as the Prometheus operator's ``PrometheusRule``
(Kubernetes); a plain Prometheus (compose.yaml) reads only a rule file (``groups:`` at the top), which is
that resource's ``spec``. ``make prometheus-rules`` regenerates it; tests/unit/app/test_deploy.py fails when the two
differ, so the one-host stack cannot silently lose an alert.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
SOURCE = DEPLOY / "base" / "alerts.yaml"
TARGET = DEPLOY / "prometheus-rules.yml"
HEADER = """\
# GENERATED from deploy/base/alerts.yaml (its spec) by `make prometheus-rules`: edit that file, not this one.
# The rule file of the one-host stack's Prometheus (compose.yaml mounts it; deploy/prometheus.yml loads it).
"""


def render(source: str) -> str:
    """The rule file for the ``PrometheusRule`` in ``source``: its groups, in order, nothing added."""
    resource = yaml.safe_load(source)
    if resource.get("kind") != "PrometheusRule":
        raise ValueError(f"{SOURCE}: expected a PrometheusRule, found {resource.get('kind')!r}")
    body = yaml.safe_dump({"groups": resource["spec"]["groups"]}, sort_keys=False, width=110, allow_unicode=True)
    return HEADER + body


def main() -> int:
    TARGET.write_text(render(SOURCE.read_text()))
    print(f"wrote {TARGET.relative_to(DEPLOY.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
