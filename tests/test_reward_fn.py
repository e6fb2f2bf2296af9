"""reward_fn=module:function finds the user's module the way `python -m` would."""

from __future__ import annotations

import sys

from ppo_cli.reward.functions import call_reward_function, load_reward_function


def test_a_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    (tmp_path / "my_gold_scorer_mod.py").write_text(
        "def score(prompts, completions):\n    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    # The console script's sys.path: no '' and not the working directory.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    func = load_reward_function("my_gold_scorer_mod:score")
    scores = call_reward_function(func, "my_gold_scorer_mod:score", ["a", "b"], ["xy", "xyz"])
    assert scores.tolist() == [2.0, 3.0]
