"""``gpl calibrate DATASET``: fit the pseudo-label calibrator on a dataset's training period and write
the artifact the streaming labeler loads (``labeler.calibrator_path``).

The fit is :func:`workers.labeler.calibrator_fit.fit_dataset_calibrator`, the one ``gpl eval`` uses: content
anchors from each user's other folds of training requests (cross-fitting), leave-one-out priors, a
monotone ridge-logistic calibrator whose user-fold CV decides abstention. The artifact records
``encoder.model`` and ``labeler.catalogue``; the labeler refuses it under any other. When the fit
abstains nothing is written and the command exits 3 (the labeler then abstains too: no pseudo-labels).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from runtime.settings import Settings

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from workers.labeler.calibrator_fit import DEFAULT_FEATURE_SET, FEATURE_SETS

    p = sub.add_parser("calibrate", help="fit the pseudo-label calibrator on a dataset and write its artifact",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET",
                   help="dataset directory (docs/eval.md; split.json optional: without it every request is "
                        "training), or 'movielens' / 'semisynth'")
    p.add_argument("--out", type=Path, default=None,
                   help="artifact path (default labeler.calibrator_path, else <data_dir>/calibrator/calibrator.json)")
    p.add_argument("--features", choices=sorted(FEATURE_SETS), default=DEFAULT_FEATURE_SET,
                   help="priors: popularity and user click rate only (default, chosen on validation); content: "
                        "anchor similarities + priors (default: %(default)s)")
    p.add_argument("--sim-seed", type=int, default=0, help="simulator seed for 'movielens'/'semisynth'")
    p.set_defaults(run=run)


def default_path(settings: Settings) -> Path:
    return settings.labeler.calibrator_path or settings.data_dir / "calibrator" / "calibrator.json"


def run(args: argparse.Namespace, settings: Settings) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gpl.commands.eval import content_encoder, training_dataset
    from runtime.encoder import encode_items, with_space
    from workers.labeler.calibrator_fit import FEATURE_SETS, fit_dataset_calibrator

    try:
        ds = training_dataset(args.dataset, settings, args.sim_seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"gpl calibrate: {e}")
        return 2
    content = content_encoder(settings)
    vectors = encode_items(with_space(content, settings.encoder), ds.item_ids, ds.item_text)
    fit = fit_dataset_calibrator(ds, vectors, settings, features=FEATURE_SETS[args.features])
    cv = {k: round(v, 4) for k, v in fit.cv.items()}
    if fit.calibrator is None:
        print(f"gpl calibrate: abstained, nothing written: {fit.reason}\n{json.dumps(cv)}")
        return 3
    out = fit.calibrator.save(args.out or default_path(settings))
    print(f"{fit.calibrator.describe()}\ncross-validation: {json.dumps(cv)}\nwritten to {out}")
    return 0
