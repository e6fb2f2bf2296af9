"""One scoring path for every reward model: a separate RM (its own tokenizer) in generate and train-ppo
scores at the last real token through `sequence_scores`, as train-rm trains it, never through the
classifier's pad-id pooling; and the reward-source checks shared by both commands."""

from __future__ import annotations

import json

import pytest
import torch
from ppo_helpers import model_cfg

from ppo_cli.errors import UserError
from ppo_cli.reward.scoring import sequence_scores
from ppo_cli.reward.sources import build_reward, check_reward_source
from ppo_cli.tiny.models import _model_config
from ppo_cli.tiny.tokenizer import EOS_TOKEN, build_tokenizer

CPU = torch.device("cpu")
PROMPTS = ["Describe the cat:", "Describe the river:", "Hi"]
COMPLETIONS = [" sad cat.", " good calm river, long and slow.", " ok"]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny random sequence classifier with a tokenizer of its own whose pad token is its EOS."""
    from transformers import LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("pad-is-eos-rm")
    tok = build_tokenizer()
    tok.add_tokens(["<|rm|>"])  # never the policy's vocabulary
    tok.pad_token = tok.eos_token
    tok.save_pretrained(str(out))
    config = _model_config("llama", len(tok), 16, 1, 2, tok.bos_token_id, tok.eos_token_id)
    config.num_labels = 1
    config.pad_token_id = tok.eos_token_id
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(out))
    return out


def _pad_is_eos(source) -> None:
    """Keep the RM's pad id == eos id as loaded (our tokenizer loader would give it a pad of its own): the
    case where the classifier's pad-id pooling finds the token before the EOS."""
    rm = source.separate
    rm.tokenizer.pad_token = rm.tokenizer.eos_token
    rm.model.config.pad_token_id = rm.tokenizer.eos_token_id


def _expected(source) -> tuple[torch.Tensor, torch.Tensor]:
    """(score at the EOS, score one token earlier), each sequence scored alone."""
    tok, model = source.separate.tokenizer, source.separate.model
    at_eos, before = [], []
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        ids = tok(prompt + completion + EOS_TOKEN)["input_ids"]
        assert ids[-1] == tok.eos_token_id
        with torch.no_grad():
            for out, row in ((at_eos, ids), (before, ids[:-1])):
                t = torch.tensor([row])
                out.append(sequence_scores(model, t, torch.ones_like(t)).item())
    return torch.tensor(at_eos), torch.tensor(before)


def test_separate_rm_scores_at_the_eos_when_pad_is_eos(rm_dir):
    source = build_reward(str(rm_dir), None, model_cfg(rm_dir), CPU, batch_size=2)
    _pad_is_eos(source)
    at_eos, before = _expected(source)
    assert not torch.allclose(at_eos, before, atol=1e-4)  # the two positions give different scores
    # generate's path (text re-tokenized for the RM), batched with right padding by EOS ids
    torch.testing.assert_close(source.score(PROMPTS, COMPLETIONS), at_eos, atol=1e-5, rtol=0)
    # train-ppo's path: the reward called with a rollout batch
    scores = source(None, None, PROMPTS, COMPLETIONS)
    torch.testing.assert_close(scores, at_eos, atol=1e-5, rtol=0)
    # and what the classifier's own pooling gives for the batch: the token before the EOS
    tok = source.separate.tokenizer
    rows = [tok(p + c + EOS_TOKEN)["input_ids"] for p, c in zip(PROMPTS, COMPLETIONS)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        pooled = source.separate.model(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(pooled, before, atol=1e-5, rtol=0)


def test_separate_rm_scores_token_ids_of_the_same_vocabulary_at_the_eos(rm_dir):
    """generate hands a separate RM with the policy's vocabulary the sampled ids as they are."""
    from ppo_cli.models import load_tokenizer

    policy_tokenizer = load_tokenizer(str(rm_dir))
    source = build_reward(str(rm_dir), None, model_cfg(rm_dir), CPU, 2, policy_tokenizer=policy_tokenizer)
    assert source.same_tokenizer
    _pad_is_eos(source)
    at_eos, _ = _expected(source)
    tok = source.separate.tokenizer
    sequences = [tok(p + c + EOS_TOKEN)["input_ids"] for p, c in zip(PROMPTS, COMPLETIONS)]
    torch.testing.assert_close(source.score(PROMPTS, COMPLETIONS, sequences), at_eos, atol=1e-5, rtol=0)


def test_reward_source_checks(tmp_path):
    with pytest.raises(UserError, match="exactly one reward source.*neither was given"):
        check_reward_source(None, None, required=True)
    with pytest.raises(UserError, match="exactly one reward source.*both were given"):
        check_reward_source("x/y", "m:f", required=True)
    with pytest.raises(UserError, match="give at most one reward source"):
        check_reward_source("x/y", "m:f", required=False)
    check_reward_source(None, None, required=False)  # generate without a reward
    with pytest.raises(UserError, match="no such directory"):
        check_reward_source(str(tmp_path / "missing"), None, required=False)
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    with pytest.raises(UserError, match="is a causal LM adapter \\(a policy\\), not a reward model"):
        check_reward_source(str(policy), None, required=True)
    (policy / "ppo_cli.json").write_text(json.dumps({"stage": "sft"}))
    with pytest.raises(UserError, match="product of the sft stage, not a reward model"):
        check_reward_source(str(policy), None, required=False)
