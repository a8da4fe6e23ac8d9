"""``gpl eval DATASET``: the paper's offline comparison on any dataset in the project's event format.

``DATASET`` is a dataset directory (docs/eval.md), ``movielens`` (the seeded funnel simulator over
data/movielens-small) or ``semisynth`` (the same funnel with a fitted click oracle: truth for every
candidate, random test exposure; gpl/simulate/semisynth.py); both are built into
``<data_dir>/eval/datasets/`` first (once). ``--validation`` evaluates on the training period only
(each user's last 20% of training requests held out): the view settings are chosen on.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.settings import Settings

if TYPE_CHECKING:
    from gpl.eval.dataset import EvalDataset
    from gpl.eval.embed import CachedEncoder

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from gpl.eval.run import DEFAULT_METHODS, METHODS

    p = sub.add_parser(
        "eval",
        help="offline comparison of GPL with its baselines (tables, results.json, plots)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", metavar="DATASET",
                   help="dataset directory, or 'movielens' / 'semisynth' to build it on the fly")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of: {', '.join(METHODS)} (default: all but gpl-text, which runs the LLM)",
    )
    p.add_argument("--validation", action="store_true",
                   help="training period only: each user's last 20%% of training requests are the held-out slice")
    p.add_argument("--space", choices=("content", "collab"), default="content",
                   help="the frozen space every method matches and reads items in: the encoder's content vectors, "
                        "or a collaborative space fitted on the training period's clicks (PureSVD, content "
                        "adapter for rarely clicked items)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1; mean ± std over them (default 3)")
    p.add_argument("--epochs", type=int, default=2, help="epochs over the exposed training rows, every method")
    p.add_argument("--out", type=Path, default=None, help="output directory (default <data_dir>/eval/results/<name>)")
    p.add_argument(
        "--anchors",
        choices=("llm", "memory"),
        default="llm",
        help="text anchors from the local LLM (cached) or the deterministic MemoryGenerator",
    )
    p.add_argument(
        "--max-llm-users",
        type=int,
        default=150,
        help="users that get LLM anchors (a fixed pseudo-random subset); 0 = all",
    )
    p.add_argument(
        "--llm-threads",
        type=int,
        default=1,
        help="torch threads while the LLM generates (1: fastest on 2 shared cores)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads while training (1 is fastest on 2 cores)")
    p.add_argument("--sim-seed", type=int, default=0, help="simulator seed when DATASET is 'movielens'/'semisynth'")
    p.add_argument(
        "--split",
        choices=("per-user", "global"),
        default="per-user",
        help="temporal split when DATASET is 'movielens'",
    )
    p.add_argument("--draws", choices=("request", "pair"), default="request",
                   help="semisynth world: an independent click draw per request (default), or the old single draw "
                        "per user-item pair (a pair clicked in training is clicked again in test)")
    p.add_argument("--taste-share", type=float, default=0.0, metavar="SHARE",
                   help="semisynth world: the positive control, where cosine(user's liked-item profile, item) in the "
                        "frozen space explains SHARE of the within-request logit variance (e.g. 0.2; default 0: off)")
    p.add_argument("--explore-share", type=float, default=0.0, metavar="SHARE",
                   help="semisynth world: SHARE of the training requests exposed uniformly at random and flagged as "
                        "exploration in their exposure events (the calibrator prefers them; default 0: none)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gpl.eval.report import print_tables
    from gpl.eval.run import EvalConfig, run_eval

    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    path = dataset_path(args.dataset, settings, args.sim_seed, args.split, draws=args.draws,
                        taste_share=args.taste_share, explore_share=args.explore_share)
    name = path.resolve().name + ("-validation" if args.validation else "")
    name += "-collab" if args.space == "collab" else ""
    out = args.out or settings.data_dir / "eval" / "results" / f"{name}-{args.anchors}"
    cfg = EvalConfig(
        methods=methods,
        seeds=args.seeds,
        epochs=args.epochs,
        anchors=args.anchors,
        max_llm_users=args.max_llm_users or None,
        out=Path(out),
        progress=not args.no_progress,
        llm_threads=args.llm_threads,
        torch_threads=args.threads,
        plots=not args.no_plots,
        validation=args.validation,
        space=args.space,
    )
    try:
        results = run_eval(path, settings, cfg)
    except (FileNotFoundError, ValueError) as e:
        log.error("gpl eval: %s", e)
        print(f"gpl eval: {e}")
        return 2
    print_tables(results)
    a = results["anchors"]
    if a["users_with_text_anchors"]:
        print(f"\ntext anchors: {a['users_with_text_anchors']}/{a['users_total']} users "
              f"({a['share_of_users_with_text_anchors']:.1%}), "
              f"{a['share_of_test_requests_anchored']:.1%} of test requests")
    for m, c in results["calibration"].items():
        print(f"{m}: {'ABSTAINED (no pseudo-labels): ' + c['reason'] if c.get('abstain') else c.get('describe')}")
    print(f"runtime: {results['timing_s']['total']:.0f} s; results in {cfg.out}")
    return 0


def dataset_path(dataset: str, settings: Settings, sim_seed: int = 0, split: str = "per-user", *,
                 draws: str = "request", taste_share: float = 0.0, explore_share: float = 0.0) -> Path:
    """A dataset directory, or the built-in ``movielens`` / ``semisynth`` built (once) under the data dir.

    ``draws``, ``taste_share`` and ``explore_share`` choose the semisynth world (gpl/simulate/semisynth.py)."""
    if dataset == "movielens":
        from gpl.eval.movielens import build_movielens, default_dir

        return build_movielens(default_dir(settings.data_dir, sim_seed), seed=sim_seed,
                               split="global" if split == "global" else "per-user")
    if dataset == "semisynth":
        from gpl.simulate.semisynth import build_semisynth
        from gpl.simulate.semisynth import default_dir as ss_dir

        cache = settings.data_dir / "eval" / "cache"
        encoder = None
        if taste_share:
            from gpl.eval.embed import CachedEncoder
            from runtime.encoder import open_encoder

            encoder = CachedEncoder(open_encoder(settings.encoder), cache)
        return build_semisynth(ss_dir(settings.data_dir, sim_seed, draws, taste_share, explore_share), seed=sim_seed,
                               cache_dir=cache, draws=draws, content_share=taste_share, encoder=encoder,
                               explore_share=explore_share)
    return Path(dataset)


def training_dataset(dataset: str, settings: Settings, sim_seed: int = 0) -> EvalDataset:
    """A dataset to fit on (``gpl calibrate``, ``gpl space fit``): without split.json every request is
    training. Raises FileNotFoundError / ValueError with a message for the user."""
    from gpl.eval.dataset import load_dataset

    path = dataset_path(dataset, settings, sim_seed)
    return load_dataset(path, training_only=not (path / "split.json").is_file())


def content_encoder(settings: Settings) -> CachedEncoder:
    """The encoder's content vectors (never through ``encoder.space``), cached under the eval cache."""
    from gpl.eval.embed import CachedEncoder
    from runtime.encoder import open_encoder

    return CachedEncoder(open_encoder(settings.encoder.model_copy(update={"space": ""})),
                         settings.data_dir / "eval" / "cache", progress=False)

