"""`minipa …` on the command line."""

from __future__ import annotations

import argparse
import sys

from minipa import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minipa", description="Stable Diffusion 1.5 with IP-Adapter, from scratch.")
    parser.add_argument("--version", action="version", version=f"minipa {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images from a text and/or image prompt")
    gen.add_argument("--prompt", default="", help="the text prompt")
    gen.add_argument("--out", default="out/minipa.png", help="where to write the PNG (a JSON sidecar goes beside it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        print(
            "minipa: no model yet — the pipeline and the tiny model in weights/ are still being built; "
            "nothing was written.",
            file=sys.stderr,
        )
        return 1
    return 0
