"""A tiny, fully local task + tokenizer + models for fast end-to-end tests of SFT -> RM -> PPO.

The task ("positive words", `task`): a prompt such as ``"Describe the river:"`` is answered by a short sentence
made of words from three lists (positive, negative, neutral). The gold metric is the share of positive minus the
share of negative words, so a policy improves by using more positive and fewer negative words. SFT data mixes the
three lists uniformly (the model learns the *format*, not the preference); preference pairs rank two such
sentences by the gold metric, so a reward model can learn it and PPO can then push the policy towards it.

Everything (tokenizer, models of several architectures, JSONL data) is built offline: random-init models in
seconds; with ``pretrain_steps`` (the demo's base model) a short full-parameter pretraining on the task's text
first makes the model a base that speaks the task's language, in well under a minute on 2 CPU cores.

Modules: `task` (words, prompts, gold metric, `positive_reward`), `tokenizer`, `models` (four architectures),
`pretrain`, `data` (the JSONL files), `cache` (`build_all`: everything at once, cached) and `cli`.

Usage::

    python -m ppo_cli.tiny OUT_DIR [--arch llama] [--hidden-size 64] [--layers 2] [--pretrain-steps 300]

(pretrained for 300 steps by default, the demo's base; `--pretrain-steps 0` for a random-init model)
"""
