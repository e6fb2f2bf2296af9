"""Build a tiny model and the task data, fully offline: ``python -m ppo_cli.tiny OUT_DIR``.

By default the model is pretrained on the task's text for DEMO_PRETRAIN_STEPS steps, as the tiny recipe's
base is (~30 s on 2 CPU cores): a random-init model answers every prompt with byte soup, which SFT, RM and
PPO runs on it would only echo. `--pretrain-steps 0` builds the untrained model the tests use, in seconds;
either way a line on stderr says which was built (stdout stays the JSON of the paths)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ppo_cli import tiny
from ppo_cli.tiny.cache import build_all
from ppo_cli.tiny.models import ARCHS
from ppo_cli.tiny.pretrain import DEMO_PRETRAIN_STEPS


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ppo_cli.tiny",
        description=tiny.__doc__.splitlines()[0],
        epilog="Prints the paths it built as JSON. A folder that holds the same build already is reused.",
    )
    parser.add_argument(
        "out_dir",
        type=Path,
        help="where to build: OUT_DIR/model (model + tokenizer) and OUT_DIR/data (JSONL)",
    )
    parser.add_argument(
        "--arch", default="llama", choices=ARCHS, help="the model's architecture (default: %(default)s)"
    )
    parser.add_argument(
        "--hidden-size", type=int, default=64, help="width of the model (default: %(default)s)"
    )
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights and the pretraining (default: %(default)s)",
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=DEMO_PRETRAIN_STEPS,
        help="full-parameter pretraining steps on the task's text, as the tiny recipe's base gets (default: "
        "%(default)s); 0 = an untrained, random-init model",
    )
    parser.add_argument(
        "--vocab-multiple",
        type=int,
        default=None,
        help="round the embedding rows up to a multiple of this, for spare rows (a pad token then needs no "
        "resize; the tiny recipe uses 64); default: exactly the tokenizer's size",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """CLI entry point: build everything into OUT_DIR and print the paths as JSON."""
    ns = parser().parse_args(argv)
    from ppo_cli.app import quiet_libraries

    quiet_libraries()  # no "Writing model shards" bars from save_pretrained
    print(what_is_built(ns.pretrain_steps), file=sys.stderr)
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


def what_is_built(pretrain_steps: int) -> str:
    """The stderr line that says whether the model will know anything."""
    if pretrain_steps > 0:
        return (
            f"tiny: building a model pretrained for {pretrain_steps} steps on the task's text "
            "(--pretrain-steps 0: an untrained model, in seconds)"
        )
    return (
        "tiny: building an UNTRAINED (random-init) model: its samples are random bytes until trained "
        f"(--pretrain-steps {DEMO_PRETRAIN_STEPS}: the tiny recipe's pretrained base)"
    )
