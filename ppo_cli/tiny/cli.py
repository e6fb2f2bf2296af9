"""Build a tiny model and the task data, fully offline: ``python -m ppo_cli.tiny OUT_DIR``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ppo_cli import tiny
from ppo_cli.tiny.cache import build_all
from ppo_cli.tiny.models import ARCHS


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """CLI entry point: build everything into OUT_DIR and print the paths as JSON."""
    parser = argparse.ArgumentParser(prog="python -m ppo_cli.tiny", description=tiny.__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", default="llama", choices=ARCHS)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pretrain-steps", type=int, default=0, help="full-parameter pretraining steps on the task's text"
    )
    parser.add_argument(
        "--vocab-multiple", type=int, default=None, help="round the embedding rows up to a multiple of this"
    )
    ns = parser.parse_args(argv)
    from ppo_cli.app import quiet_libraries

    quiet_libraries()  # no "Writing model shards" bars from save_pretrained
    paths = build_all(
        ns.out_dir,
        arch=ns.arch,
        hidden_size=ns.hidden_size,
        num_layers=ns.layers,
        num_heads=ns.heads,
        seed=ns.seed,
        pretrain_steps=ns.pretrain_steps,
        vocab_multiple=ns.vocab_multiple,
    )
    print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
    return paths
