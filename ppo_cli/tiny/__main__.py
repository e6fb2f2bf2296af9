"""`python -m ppo_cli.tiny OUT_DIR ...`: build a tiny model and the task data (see ppo_cli.tiny.cli)."""

from ppo_cli.tiny.cli import main

main()
