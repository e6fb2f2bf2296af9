"""Chat templates across the stages: the reward model is trained on, and scores, the sequence PPO scores.

A chat policy ends its answer with its template's end-of-turn token (<|im_end|>, <|eot_id|>, EOS...).
Generation stops at the first stop id (models.eos_token_ids) and PPO reads the reward at that token. For
each template family: SFT teaches the policy to emit that token, train-rm ends each sequence with it (no
trailing template glue, no extra EOS after it), and a reward model with its own tokenizer sees a
conversation through its own chat template.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from ppo_helpers import model_cfg

from ppo_cli import generate
from ppo_cli.data import Row, encode_prompt, encode_sft_row
from ppo_cli.models import eos_token_ids, load_tokenizer
from ppo_cli.reward import sources
from ppo_cli.reward.separate import SeparateRewardModel
from ppo_cli.rlhf import truncate_after_eos
from ppo_cli.rm.pairs import encode_pair, encode_side
from ppo_cli.tiny.models import _model_config
from ppo_cli.tiny.tokenizer import EOS_TOKEN, IM_END, build_tokenizer

CPU = torch.device("cpu")

# Qwen2.5-Instruct's shape: a default system turn, every turn closed by "<|im_end|>\n", EOS = <|im_end|>.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama 3's shape: BOS written by the template, turns closed by <|eot_id|> with no newline after it.
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Turns closed by EOS itself, nothing after it.
EOS_CLOSED_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# No special token closes a turn: the policy can only stop with EOS.
PLAIN_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '### ' + message['role'] + ':\\n' + message['content'] + '\\n\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### assistant:\\n' }}{%- endif %}"
)

FAMILIES = ["chatml", "qwen-instruct", "llama3", "eos-closed", "plain-template", "text"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


def family(name: str, tokenizer_dir):
    """(tokenizer as the stages load it, a stand-in for the model: only its generation config's EOS ids)."""
    tok = load_tokenizer(str(tokenizer_dir))
    generation_eos = [tok.eos_token_id]
    if name == "qwen-instruct":
        tok.chat_template = QWEN_TEMPLATE
        tok.eos_token = IM_END
        generation_eos = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOS_TOKEN)]
    elif name == "llama3":
        # Special in the vocabulary (as in Llama 3's tokenizer.json) but not named special tokens; the
        # model's generation config stops at EOS only.
        tok.add_tokens(LLAMA3_TOKENS, special_tokens=True)
        tok.chat_template = LLAMA3_TEMPLATE
    elif name == "eos-closed":
        tok.chat_template = EOS_CLOSED_TEMPLATE
    elif name == "plain-template":
        tok.chat_template = PLAIN_TEMPLATE
    elif name == "text":
        tok.chat_template = None
    else:
        assert name == "chatml"  # the tiny template: <|im_end|> closes a turn, EOS is <|endoftext|>
    return tok, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=generation_eos))


def pair_row(name: str) -> dict:
    if name == "text":
        return {"prompt": "Describe the river:", "chosen": " good calm river.", "rejected": " bad river."}
    return {
        "prompt": [{"role": "user", "content": "Describe the river:"}],
        "chosen": [{"role": "assistant", "content": "good calm river."}],
        "rejected": [{"role": "assistant", "content": "bad river."}],
    }


def sft_rows(data: dict) -> list[Row]:
    """The SFT rows of the chosen answer: prompt/completion, and for conversations also messages."""
    rows = [Row({"prompt": data["prompt"], "completion": data["chosen"]}, "sft.jsonl", 1)]
    if not isinstance(data["prompt"], str):
        rows.append(Row({"messages": [*data["prompt"], *data["chosen"]]}, "sft.jsonl", 2))
    return rows


def ppo_response(learned: list[int], stop_ids: list[int], pad_id: int) -> list[int]:
    """What PPO keeps of a sampled response: up to and including its first stop id."""
    ids, mask = truncate_after_eos(torch.tensor([learned]), stop_ids, pad_id)
    return ids[0][mask[0]].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_teaches_the_stop_and_the_rm_ends_where_ppo_reads_the_score(name, tokenizer_dir):
    tok, model = family(name, tokenizer_dir)
    stop_ids = eos_token_ids(tok, model)
    data = pair_row(name)
    query = encode_prompt(tok, data["prompt"], "prompts.jsonl")  # what PPO samples from
    for row in sft_rows(data):
        ids, labels = encode_sft_row(tok, row)
        assert ids[: len(query)] == query, f"{row.data}: SFT trains on another prompt encoding than PPO's"
        # A policy fit to this row emits the tokens after the query; PPO keeps them through the first stop.
        response = ppo_response(ids[len(query) :], stop_ids, tok.pad_token_id)
        assert response[-1] in stop_ids, (
            f"{name}: SFT never teaches a token that stops generation (stop ids {stop_ids}); "
            f"the learned answer is {tok.decode(ids[len(query) :])!r}"
        )
        assert labels[len(query) : len(query) + len(response)] == response, "the stop token carries no loss"
        rm = encode_pair(tok, Row(data, "prefs.jsonl", 1))["chosen"]
        assert rm == query + response, (
            f"{name}: the RM learns its score at {tok.decode(rm[len(query) :])!r}, PPO reads it at "
            f"{tok.decode(response)!r}"
        )


def test_stop_ids_include_the_turn_end_a_model_config_leaves_out(tokenizer_dir):
    tok, model = family("llama3", tokenizer_dir)
    assert eos_token_ids(tok, model) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]
    tok, model = family("qwen-instruct", tokenizer_dir)  # <|im_end|> is EOS; <|endoftext|> is a stop too
    assert eos_token_ids(tok, model) == [
        tok.convert_tokens_to_ids(IM_END),
        tok.convert_tokens_to_ids(EOS_TOKEN),
    ]
    for name in ("eos-closed", "plain-template", "text"):
        tok, model = family(name, tokenizer_dir)
        assert eos_token_ids(tok, model) == [tok.eos_token_id]


# ------------------------------------------------------------------------ a reward model with its own tokenizer


@pytest.fixture(scope="module")
def separate_rm_dir(tmp_path_factory):
    """A real (random, tiny) sequence classifier in a directory of its own. Its tokenizer has the ChatML
    template and one token more than the tiny policy's, so it never counts as sharing the policy's."""
    from transformers import LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("separate-rm")
    tok = build_tokenizer()
    tok.add_tokens(["<|rm|>"])
    tok.save_pretrained(str(out))
    config = _model_config("llama", len(tok), 16, 1, 2, tok.bos_token_id, tok.eos_token_id)
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def separate_rm(separate_rm_dir):
    """SeparateRewardModel on separate_rm_dir; `seen` records the unpadded token ids of every scored row."""
    rm = SeparateRewardModel(str(separate_rm_dir), model_cfg(separate_rm_dir), CPU, batch_size=2)
    rm.seen = []

    def record(module, args, kwargs):
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]):
            rm.seen.append(ids[mask.bool()].tolist())

    rm.model.register_forward_pre_hook(record, with_kwargs=True)
    return rm


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Describe the river:"},
]


def test_separate_rm_renders_a_conversation_through_its_chat_template(separate_rm):
    tok = separate_rm.tokenizer
    separate_rm.seen.clear()
    scores = separate_rm.score([CONVERSATION, "Describe the cat:"], ["good calm river.", " sad cat."])
    answer = [{"role": "assistant", "content": "good calm river."}]
    rendered = tok.apply_chat_template([*CONVERSATION, *answer], tokenize=False)
    # The conversation as the RM's template renders it, up to the <|im_end|> that closes the answer: the
    # token train-rm trains the score at (the newline after it is template glue).
    assert rendered.endswith(IM_END + "\n")
    expected = tok(rendered[: -len("\n")], add_special_tokens=False)["input_ids"]
    assert separate_rm.seen[0] == expected, f"scored {tok.decode(separate_rm.seen[0])!r}, not {rendered!r}"
    assert expected == encode_side(tok, CONVERSATION, answer, "x")  # exactly what train-rm trains on
    # A text prompt stays text: prompt + completion + EOS.
    assert separate_rm.seen[1] == tok("Describe the cat: sad cat." + EOS_TOKEN)["input_ids"]
    with torch.no_grad():
        ids = torch.tensor([expected])
        alone = separate_rm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0]
    assert scores[0].item() == pytest.approx(alone.item(), abs=1e-5)


def test_separate_rm_without_a_template_reads_a_conversation_as_text(separate_rm, monkeypatch):
    tok = separate_rm.tokenizer
    monkeypatch.setattr(tok, "chat_template", None)
    separate_rm.seen.clear()
    separate_rm.score([CONVERSATION], ["good."])
    expected = "system: Be brief.\nuser: Describe the river:good." + EOS_TOKEN
    assert separate_rm.seen == [tok(expected)["input_ids"]]


def _write_conversations(path, n: int) -> list[list[dict]]:
    conversations = [[{"role": "user", "content": f"Describe the river {i}:"}] for i in range(n)]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return conversations


def test_ppo_rollout_hands_the_reward_the_conversations(tiny, tmp_path):
    from ppo_helpers import build_tiny_roles, make_trainer, ppo_config

    conversations = _write_conversations(tmp_path / "chat.jsonl", 4)
    roles, tok = build_tiny_roles(tiny["model"], None, None)
    cfg = ppo_config(tiny["model"], tmp_path / "chat.jsonl", tmp_path / "run", "generation.max_new_tokens=3")
    seen = []

    def reward(qr, mask, prompts, completions):
        seen.extend(prompts)
        return torch.zeros(len(prompts))

    trainer = make_trainer(cfg, roles, tok, reward=reward)
    rollout, _ = trainer.rollout(trainer.prompts[:2])
    assert seen == conversations[:2]
    assert rollout.prompts == [f"user: Describe the river {i}:" for i in range(2)]  # logged as text


def test_reward_function_gets_trls_form(monkeypatch):
    """Text prompts and completions stay strings; a conversation prompt arrives as its messages and its
    completion as one assistant message, as TRL's GRPOTrainer passes them."""

    seen = []

    def func(prompts, completions):
        seen.extend(zip(prompts, completions))
        return [0.0] * len(prompts)

    monkeypatch.setattr(sources, "load_reward_function", lambda spec: func)
    reward = sources.build_reward(None, "m:f", None, CPU, 1)
    reward(None, None, [CONVERSATION, "Describe the cat:"], ["a", "b"])
    assert seen == [(CONVERSATION, [{"role": "assistant", "content": "a"}]), ("Describe the cat:", "b")]


def test_generate_scores_conversations_with_the_separate_rm(tiny, separate_rm_dir, tmp_path, monkeypatch):
    from ppo_cli.app import precheck

    conversations = _write_conversations(tmp_path / "chat.jsonl", 3)
    seen = []

    def score(self, prompts, completions):
        seen.extend(prompts)
        return torch.zeros(len(prompts))

    monkeypatch.setattr(SeparateRewardModel, "score", score)
    overrides = [
        f"checkpoint={tiny['model']}",
        f"data.prompts={tmp_path / 'chat.jsonl'}",
        f"output={tmp_path / 'out.jsonl'}",
        f"reward_checkpoint={separate_rm_dir}",
        "generation.max_new_tokens=3",
        "device=cpu",
    ]
    rows = generate.run(precheck("generate", overrides, "generate"))
    assert seen == conversations and [r["reward"] for r in rows] == [0.0] * 3
