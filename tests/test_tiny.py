"""Tests for ppo_cli.tiny: the synthetic task, its tokenizer, the tiny models and the data files."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from ppo_cli.tiny import cache as tiny_cache
from ppo_cli.tiny import cli as tiny_cli
from ppo_cli.tiny import data as tiny_data
from ppo_cli.tiny import models as tiny_models
from ppo_cli.tiny import pretrain as tiny_pretrain
from ppo_cli.tiny import task as tiny_task
from ppo_cli.tiny import tokenizer as tiny_tokenizer

ALL_WORDS = set(tiny_task.POSITIVE_WORDS) | set(tiny_task.NEGATIVE_WORDS) | set(tiny_task.NEUTRAL_WORDS)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _random_ascii(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.printable) for _ in range(n))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer.build_tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """One built model dir per arch, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("models")
    return {
        arch: tiny_models.build_tiny_model(root / arch, arch=arch, tokenizer=tokenizer)
        for arch in tiny_models.ARCHS
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return tiny_data.write_task_data(tmp_path_factory.mktemp("data"))


# ---------------------------------------------------------------------------------------------------------- task


def test_word_lists_are_disjoint_and_sized():
    assert (
        len(tiny_task.POSITIVE_WORDS) == 30
        and len(tiny_task.NEGATIVE_WORDS) == 30
        and len(tiny_task.NEUTRAL_WORDS) == 40
    )
    assert len(ALL_WORDS) == 100  # no duplicates within or across lists
    assert all(w.isalpha() and w.islower() for w in ALL_WORDS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" good happy table.", 2 / 3),
        (" bad.", -1.0),
        (" good good sad river.", 1 / 4),
        (" table chair seven.", 0.0),
        ("Good, BAD! river.", 0.0),  # case-insensitive, punctuation ignored
        ("HAPPY!!!", 1.0),
        ("", 0.0),  # no words: divided by max(1, 0)
        ("...", 0.0),
        ("good,bad,awful", -1 / 3),  # punctuation separates words
        ("goodness badly", 0.0),  # whole words only
    ],
)
def test_gold_score(text, expected):
    assert tiny_task.gold_score(text) == pytest.approx(expected)


def test_positive_reward_is_gold_score_per_completion():
    completions = [" good river.", " sad cold.", " table."]
    assert tiny_task.positive_reward(["p1", "p2", "p3"], completions) == [0.5, -1.0, 0.0]


def test_prompts_and_completions_shape():
    prompts = tiny_task.all_prompts()
    assert len(prompts) == len(set(prompts)) == len(tiny_task.PROMPT_TEMPLATES) * len(tiny_task.TOPICS)
    assert all(p[-1] in ":?" for p in prompts)
    assert "Tell me about an ocean:" in prompts and "Describe the river:" in prompts

    rng = random.Random(0)
    for _ in range(200):
        c = tiny_task.sample_completion(rng)
        assert c.startswith(" ") and c.endswith(".")
        words = c[1:-1].split(" ")
        assert tiny_task.MIN_WORDS <= len(words) <= tiny_task.MAX_WORDS and set(words) <= ALL_WORDS


# ----------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 512 and tokenizer.model_max_length == 512
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == eos
    # the specials come last, as in real checkpoints
    assert tokenizer.convert_tokens_to_ids(list(tiny_tokenizer.SPECIAL_TOKENS)) == [509, 510, 511]
    # plain encoding adds no BOS/EOS (Qwen-style)
    assert tokenizer("good")["input_ids"] == tokenizer.encode("good", add_special_tokens=True)


def test_tokenizer_round_trips_task_text_and_ascii(tokenizer):
    rng = random.Random(0)
    texts = tiny_task.all_prompts() + [tiny_task.sample_completion(rng) for _ in range(100)]
    texts += [_random_ascii(rng, rng.randint(1, 80)) for _ in range(200)]
    texts += ["", " ", "\n\n", "  two  spaces\tand\ttabs\r\n", "123 4567 89.0", "a\x00b\x7f"]
    for text in texts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_prompt_completion_concatenation_is_clean(tokenizer, data):
    """tok(prompt + completion) == tok(prompt) + tok(completion): the leading space keeps the boundary."""
    for row in _read_jsonl(data["sft"])[:300]:
        joint = tokenizer(row["prompt"] + row["completion"])["input_ids"]
        apart = tokenizer(row["prompt"])["input_ids"] + tokenizer(row["completion"])["input_ids"]
        assert joint == apart


def test_tokenizer_is_deterministic_and_reloads(tokenizer, tmp_path):
    again = tiny_tokenizer.build_tokenizer(tmp_path)
    assert again.get_vocab() == tokenizer.get_vocab()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.pad_token is None and loaded.eos_token_id == tokenizer.eos_token_id
    assert loaded.chat_template == tokenizer.chat_template
    assert (
        loaded("Describe the river: good 42.")["input_ids"]
        == tokenizer("Describe the river: good 42.")["input_ids"]
    )


CONVERSATION = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Describe the river:"},
    {"role": "assistant", "content": "good river happy."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "sad cold dog."},
]


def test_chat_template_renders_chatml(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe nice.<|im_end|>\n"
        "<|im_start|>user\nDescribe the river:<|im_end|>\n"
        "<|im_start|>assistant\ngood river happy.<|im_end|>\n"
        "<|im_start|>user\nAnd the dog?<|im_end|>\n"
        "<|im_start|>assistant\nsad cold dog.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nDescribe the river:<|im_end|>\n<|im_start|>assistant\n")
    no_gen = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert no_gen.endswith("<|im_end|>\n")


def _expected_ids_and_mask(tokenizer, conversation) -> tuple[list[int], list[int]]:
    """Token ids and assistant mask built piece by piece: assistant content + <|im_end|> is masked."""
    ids: list[int] = []
    mask: list[int] = []

    def add(text: str, masked: bool) -> None:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([int(masked)] * len(piece))

    for message in conversation:
        add(f"<|im_start|>{message['role']}\n", False)
        is_assistant = message["role"] == "assistant"
        add(message["content"] + "<|im_end|>", is_assistant)
        add("\n", False)
    return ids, mask


def test_chat_template_assistant_mask_marks_exactly_assistant_tokens(tokenizer):
    out = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    expected_ids, expected_mask = _expected_ids_and_mask(tokenizer, CONVERSATION)
    assert out["input_ids"] == expected_ids
    assert out["assistant_masks"] == expected_mask
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "good river happy.<|im_end|>sad cold dog.<|im_end|>"


def test_chat_template_on_task_messages(tokenizer, data):
    for row in _read_jsonl(data["sft_messages"])[:50]:
        out = tokenizer.apply_chat_template(
            row["messages"], return_dict=True, return_assistant_tokens_mask=True
        )
        expected_ids, expected_mask = _expected_ids_and_mask(tokenizer, row["messages"])
        assert (out["input_ids"], out["assistant_masks"]) == (expected_ids, expected_mask)


# -------------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_model_loads_and_runs(arch, model_dirs, tokenizer):
    path = model_dirs[arch]
    loaded_tok = AutoTokenizer.from_pretrained(path)
    assert loaded_tok.pad_token is None  # also for qwen2, whose tokenizer class would default one
    assert (
        loaded_tok.eos_token_id == tokenizer.eos_token_id
        and loaded_tok.chat_template == tokenizer.chat_template
    )
    rng = random.Random(arch)
    for text in ["Describe the river: good happy 123.", _random_ascii(rng, 60), _random_ascii(rng, 60)]:
        assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == arch and model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer) and model.config.pad_token_id is None
    assert model.config.eos_token_id == model.config.bos_token_id == tokenizer.eos_token_id
    if arch in ("llama", "qwen2"):
        assert model.config.tie_word_embeddings is False
    batch = tokenizer(["Describe the river: good day.", "Tell me about a dog: sad dog."], return_tensors=None)
    seq = min(len(ids) for ids in batch["input_ids"])
    input_ids = torch.tensor([ids[:seq] for ids in batch["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (2, seq, len(tokenizer))
    assert torch.isfinite(logits).all()

    classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    with torch.no_grad():
        assert classifier(input_ids=input_ids[:1]).logits.shape == (1, 1)  # batch 1 needs no pad id
        # batches > 1 need a pad id to find the last token: the loader's job; mimic it here
        classifier.config.pad_token_id = tokenizer.eos_token_id
        assert classifier(input_ids=input_ids).logits.shape == (2, 1)


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_model_build_is_deterministic(arch, model_dirs, tokenizer, tmp_path):
    reference = load_file(model_dirs[arch] / "model.safetensors")
    same = load_file(
        tiny_models.build_tiny_model(tmp_path / "same", arch=arch, tokenizer=tokenizer) / "model.safetensors"
    )
    assert reference.keys() == same.keys()
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    other = load_file(
        tiny_models.build_tiny_model(tmp_path / "other", arch=arch, seed=1, tokenizer=tokenizer)
        / "model.safetensors"
    )
    assert any(not torch.equal(reference[k], other[k]) for k in reference)


def test_unknown_arch_is_rejected(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="unknown arch"):
        tiny_models.build_tiny_model(tmp_path, arch="mamba", tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------------- data


def test_data_files_columns_and_counts(data):
    expected = {
        "sft": (2000, {"prompt", "completion"}),
        "sft_eval": (200, {"prompt", "completion"}),
        "prefs": (2000, {"prompt", "chosen", "rejected"}),
        "prefs_eval": (200, {"prompt", "chosen", "rejected"}),
        "prompts": (256, {"prompt"}),
        "prompts_eval": (64, {"prompt"}),
        "sft_messages": (200, {"messages"}),
    }
    assert set(data) == set(expected)
    for name, (n_rows, columns) in expected.items():
        rows = _read_jsonl(data[name])
        assert len(rows) == n_rows, name
        assert all(set(row) == columns for row in rows), name


def test_sft_completions_are_mixed_and_well_formed(data):
    rows = _read_jsonl(data["sft"])
    counts = {"pos": 0, "neg": 0, "neu": 0}
    for row in rows:
        c = row["completion"]
        assert c.startswith(" ") and c.endswith(".") and not c.startswith("  ")
        for w in c[1:-1].split(" "):
            key = (
                "pos" if w in tiny_task.POSITIVE_WORDS else "neg" if w in tiny_task.NEGATIVE_WORDS else "neu"
            )
            assert key != "neu" or w in tiny_task.NEUTRAL_WORDS
            counts[key] += 1
    total = sum(counts.values())
    assert all(0.28 < n / total < 0.38 for n in counts.values()), counts  # roughly a third each
    mean_gold = sum(tiny_task.gold_score(r["completion"]) for r in rows) / len(rows)
    assert abs(mean_gold) < 0.05  # no preference baked into SFT


@pytest.mark.parametrize("name", ["prefs", "prefs_eval"])
def test_prefs_chosen_beats_rejected(data, name):
    for row in _read_jsonl(data[name]):
        assert tiny_task.gold_score(row["chosen"]) > tiny_task.gold_score(row["rejected"])
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")


def test_prompt_splits_are_disjoint_and_distinct(data):
    train = [r["prompt"] for r in _read_jsonl(data["prompts"])]
    evals = [r["prompt"] for r in _read_jsonl(data["prompts_eval"])]
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)
    assert set(train) | set(evals) <= set(tiny_task.all_prompts())


def test_sft_messages_format(data):
    for row in _read_jsonl(data["sft_messages"]):
        user, assistant = row["messages"]
        assert user["role"] == "user" and user["content"] in tiny_task.all_prompts()
        assert assistant["role"] == "assistant" and assistant["content"].endswith(".")
        assert not assistant["content"].startswith(" ")


def test_data_is_deterministic_and_seeded(tmp_path):
    kwargs = {"n_sft": 50, "n_pref": 50, "n_prompts": 300, "n_eval_prompts": 200}
    a = tiny_data.write_task_data(tmp_path / "a", **kwargs)
    b = tiny_data.write_task_data(tmp_path / "b", **kwargs)
    c = tiny_data.write_task_data(tmp_path / "c", seed=1, **kwargs)
    assert all(a[k].read_text() == b[k].read_text() for k in a)
    assert a["sft"].read_text() != c["sft"].read_text()
    # more prompts than the pool holds: still the requested counts
    assert len(_read_jsonl(a["prompts"])) == 300 and len(_read_jsonl(a["prompts_eval"])) == 200


# ----------------------------------------------------------------------------------------------- build_all + CLI


def test_build_all_caches_and_rebuilds_on_new_args(tmp_path):
    paths = tiny_cache.build_all(tmp_path, arch="gpt2", hidden_size=32, num_layers=1)
    assert (paths["model"] / "config.json").is_file() and paths["sft"].is_file()
    assert paths["prefs"] == paths["data"] / "prefs.jsonl"
    weights = paths["model"] / "model.safetensors"
    stamp = tmp_path / "tiny_build.json"
    first = (weights.stat().st_mtime_ns, stamp.read_text())

    # same arguments, spelled differently (defaults made explicit): cached, nothing rewritten
    again = tiny_cache.build_all(tmp_path, arch="gpt2", hidden_size=32, num_layers=1, num_heads=4, seed=0)
    assert again == paths
    assert (weights.stat().st_mtime_ns, stamp.read_text()) == first

    tiny_cache.build_all(tmp_path, arch="gpt2", hidden_size=32, num_layers=1, seed=1)
    assert json.loads(stamp.read_text())["seed"] == 1
    assert AutoModelForCausalLM.from_pretrained(paths["model"]).config.n_layer == 1

    with pytest.raises(TypeError):
        tiny_cache.build_all(tmp_path, arch="gpt2", hiden_size=32)


def test_cli(tmp_path, capsys):
    tiny_cli.main(
        [str(tmp_path), "--arch", "qwen2", "--hidden-size", "32", "--layers", "1", "--pretrain-steps", "0"]
    )
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed["model"]) == tmp_path / "model"
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (
        config["model_type"] == "qwen2" and config["hidden_size"] == 32 and config["num_hidden_layers"] == 1
    )


# ------------------------------------------------------------------------------------ pretraining + spare rows


def test_embedding_rows():
    assert tiny_models.embedding_rows(512, None) == 512  # exact: a pad token needs a resize (GPT-2's case)
    assert tiny_models.embedding_rows(512, 64) == 576  # at least one spare row, like Qwen or Pythia
    assert tiny_models.embedding_rows(500, 64) == 512
    with pytest.raises(ValueError):
        tiny_models.embedding_rows(512, 0)


def test_pretraining_texts_are_task_text_ending_with_eos(tokenizer):
    sequences = tiny_pretrain.pretraining_texts(tokenizer, 40, seed=0)
    assert len(sequences) == 40 and all(s[-1] == tokenizer.eos_token_id for s in sequences)
    texts = [tokenizer.decode(s) for s in sequences]
    assert any(t.startswith(tiny_tokenizer.IM_START) for t in texts)  # some chat-format exchanges
    assert any(t.split(" ")[0] in {p.split(" ")[0] for p in tiny_task.all_prompts()} for t in texts)
    assert tiny_pretrain.pretraining_texts(tokenizer, 40, seed=0) == sequences


def test_pretraining_lowers_the_task_loss(tokenizer):
    """A few dozen full-parameter steps already take the random-init model far below the uniform loss."""
    config = tiny_models._model_config("llama", 576, 64, 2, 4, tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    threads = torch.get_num_threads()
    losses = tiny_pretrain.pretrain(model, tokenizer, steps=40, batch_size=16)
    assert torch.get_num_threads() == threads  # restored after the single-threaded loop
    assert len(losses) == 40 and losses[0] > 6.0  # ~ln(576) at random init
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
    assert not model.training


def test_builder_pretrains_when_asked(tokenizer, tmp_path):
    plain = load_file(tiny_models.build_tiny_model(tmp_path / "a", tokenizer=tokenizer) / "model.safetensors")
    trained = load_file(
        tiny_models.build_tiny_model(tmp_path / "b", tokenizer=tokenizer, pretrain_steps=2)
        / "model.safetensors"
    )
    assert plain.keys() == trained.keys()
    assert any(not torch.equal(plain[k], trained[k]) for k in plain)


def test_spare_rows_mean_no_resize_for_the_pad_token(tokenizer, tmp_path):
    """With spare rows the loader's new pad token fits in the matrix; an exact vocab gets resized."""
    from omegaconf import OmegaConf

    from ppo_cli.config import ModelConfig
    from ppo_cli.models import load_causal_lm, load_tokenizer

    spare = tiny_models.build_tiny_model(tmp_path / "spare", tokenizer=tokenizer, vocab_multiple=64)
    exact = tiny_models.build_tiny_model(tmp_path / "exact", arch="gpt2", tokenizer=tokenizer, num_layers=1)
    cfg = OmegaConf.structured(ModelConfig(name_or_path=str(spare), dtype="float32"))
    for path, rows in ((spare, 576), (exact, 513)):
        loaded_tok = load_tokenizer(str(path))
        assert loaded_tok.pad_token_id == 512  # a new <|pad|> after the 512 tokens
        model = load_causal_lm(cfg, loaded_tok, torch.device("cpu"), name_or_path=str(path))
        assert model.get_input_embeddings().weight.shape[0] == rows
