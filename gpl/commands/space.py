"""``gpl space fit DATASET``: fit a collaborative frozen space on a dataset's training clicks.

The space (runtime/collab_space.py: a normalised PureSVD of who clicked what, with a content adapter
for items the clicks never reached) is written to ``<data_dir>/spaces/<name>.npz``, where the name is
``collab-svd<dim>-<version>`` and the version a digest of the clicks, the settings and the content vectors.
Point ``encoder.space`` (GPL_ENCODER__SPACE) at that file and the indexer, the anchors, the labeler, the
trainer and `gpl calibrate` all match in it: the item collection becomes ``items__<encoder>__<name>``, so
it never mixes with the content collection. Refit on a later period and you get a new name and a new
collection; the space never changes under a running stream (it is frozen, like the encoder).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from runtime.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("space", help="fit a collaborative frozen space (matching in a behaviour space)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ss = p.add_subparsers(dest="space_cmd", required=True, metavar="COMMAND")
    f = ss.add_parser("fit", help="fit the space on a dataset's training clicks and write it",
                      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("dataset", metavar="DATASET",
                   help="dataset directory (docs/eval.md; split.json optional: without it every request is "
                        "training), or 'movielens' / 'semisynth'")
    f.add_argument("--dim", type=int, default=64, help="dimensions of the space (default %(default)s)")
    f.add_argument("--popularity-beta", type=float, default=0.5,
                   help="item column scale count^(beta-1): 1 keeps raw co-clicks (the most popular items dominate), "
                        "0.5 the usual damping (default %(default)s)")
    f.add_argument("--min-clicks", type=int, default=5,
                   help="clicks an item needs to fit the content adapter; fewer blend towards it (default "
                        "%(default)s)")
    f.add_argument("--out", type=Path, default=None, help="directory (default <data_dir>/spaces)")
    f.add_argument("--sim-seed", type=int, default=0, help="simulator seed for 'movielens'/'semisynth'")
    f.set_defaults(run=run_fit)


def run_fit(args: argparse.Namespace, settings: Settings) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gpl.commands.eval import content_encoder, training_dataset
    from gpl.eval.embed import training_collab_space
    from runtime.collab_space import CollabConfig

    try:
        ds = training_dataset(args.dataset, settings, args.sim_seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"gpl space fit: {e}")
        return 2
    content = content_encoder(settings)
    cfg = CollabConfig(dim=args.dim, popularity_beta=args.popularity_beta, min_clicks=args.min_clicks)
    try:
        space = training_collab_space(ds, content.encode(ds.item_text, desc="embed items"), cfg,
                                      content_id=content.id)
    except ValueError as e:
        print(f"gpl space fit: {e}")
        return 3
    out = space.save((args.out or settings.data_dir / "spaces") / f"{space.name}.npz")
    info = space.info
    print(f"space {space.name}: {info['clicks']} clicks of {info['users']} users on {info['clicked_items']} items; "
          f"{info['adapted_items']} of {info['items']} items placed mostly by their content\n"
          f"written to {out}\nuse it: GPL_ENCODER__SPACE={out}  (collection "
          f"{settings.encoder.model_copy(update={'space': str(out)}).collection})")
    return 0
