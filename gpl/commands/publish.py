"""``gpl publish --list | --rollback``: the models published for serving, and going back one.

The trainer publishes a checkpoint only when it passes the quality gate (``workers/trainer/publish.py``); this
command is the operator's side: ``--list`` prints the published stack (newest last, ``*`` marks the
pointer) and the last gate decisions; ``--rollback`` points serving back at the previously published
model. A running trainer sees the rollback at its next checkpoint and gates against the restored model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runtime.settings import Settings
from workers.trainer.published_area import PublishedArea


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="list the published pre-ranker models, or roll back to the previous one",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="published models and the last gate decisions")
    what.add_argument("--rollback", action="store_true", help="point serving at the previously published model")
    p.add_argument("--dir", type=Path, help="published area (default <data_dir>/checkpoints/published)")
    p.add_argument("--decisions", type=int, default=10, help="--list: gate decisions shown (default 10)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    area = PublishedArea(args.dir or settings.checkpoints_dir / "published", settings.trainer.keep_published)
    if args.rollback:
        try:
            to = area.rollback()
        except (ValueError, FileNotFoundError) as e:
            print(f"rollback refused: {e}")
            return 1
        print(f"rolled back: serving {to['file']} (version {to['version']})")
        return 0
    current = area.current()
    stack = area.stack()
    if not stack:
        print(f"nothing published in {area.directory}")
    for entry in stack:
        mark = "*" if current is not None and entry["file"] == current.name else " "
        print(f"{mark} {entry['file']}  version {entry['version']}  AUC {entry['auc']}  GAUC {entry['gauc']}")
    for d in area.decisions()[-args.decisions:]:
        print(json.dumps({k: d[k] for k in ("candidate", "published", "outcome", "reason")}))
    return 0
