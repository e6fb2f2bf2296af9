"""Property-based tests (hypothesis): whatever a user's data rows or overrides hold, ppo-cli either accepts
them with consistent results or says what is wrong as a UserError / exit 2 — never another exception; and
the resumable state (data order, RNG) round-trips from any point."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppo_cli import checkpoint as ckpt
from ppo_cli.data import (
    IGNORE_INDEX,
    EpochBatches,
    Row,
    build_prompts,
    build_sft_examples,
    encode_sft_row,
    prompt_of,
    turn_end_id,
)
from ppo_cli.errors import UserError
from ppo_cli.rm.pairs import build_pair_examples, encode_pair

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ---------------------------------------------------------------------------------------------- rows

FIELDS = ["prompt", "completion", "messages", "text", "chosen", "rejected", "margin", "role", "content"]
ROLES = ["user", "assistant", "system", "tool"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(ROLES),
)
# Anything JSON can hold, with dict keys biased towards the field names the stages look for.
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.one_of(st.sampled_from(ROLES), json_values),
            "content": st.one_of(st.text(max_size=30), json_values),
        }
    ),
    max_size=4,
)
field_values = st.one_of(st.text(max_size=40), messages, json_values)
rows = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=5)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from ppo_cli.models import load_tokenizer

    return load_tokenizer(str(tiny["model"]))  # a chat template with {% generation %} blocks, a pad added


def _check_ids(ids, tokenizer) -> None:
    assert isinstance(ids, list) and ids
    assert all(isinstance(t, int) and 0 <= t < len(tokenizer) for t in ids)


@SETTINGS
@given(data=rows)
def test_sft_rows_encode_consistently_or_raise_user_error(tokenizer, data):
    row = Row(data, "data.jsonl", 7)
    try:
        ids, labels = encode_sft_row(tokenizer, row)
    except UserError as exc:
        assert "data.jsonl, row 7" in str(exc)  # names the file and the row
        return
    _check_ids(ids, tokenizer)
    assert len(labels) == len(ids)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids))
    # After the length limit: within max_length, still aligned, and never an example without a target.
    examples, report = build_sft_examples(tokenizer, [row], 8, "truncate")
    assert report.total == 1 and len(examples) + report.dropped + report.empty == 1
    for example in examples:
        assert 2 <= len(example["input_ids"]) <= 8 and len(example["labels"]) == len(example["input_ids"])
        assert any(label != IGNORE_INDEX for label in example["labels"][1:])


@SETTINGS
@given(data=rows)
def test_preference_rows_encode_consistently_or_raise_user_error(tokenizer, data):
    row = Row(data, "prefs.jsonl", 3)
    try:
        pair = encode_pair(tokenizer, row)
    except UserError as exc:
        assert "prefs.jsonl, row 3" in str(exc)
        return
    for side in ("chosen", "rejected"):
        _check_ids(pair[side], tokenizer)
        # The RM scores the last token: where a response stops (EOS, or the template's <|im_end|>).
        assert pair[side][-1] in (tokenizer.eos_token_id, turn_end_id(tokenizer))
    assert pair["margin"] is None or isinstance(pair["margin"], float)
    examples, report = build_pair_examples(tokenizer, [row], 6, "truncate")
    for example in examples:
        assert all(len(example[side]) <= 6 for side in ("chosen", "rejected"))


@SETTINGS
@given(data=rows)
def test_prompt_rows_give_a_prompt_or_raise_user_error(tokenizer, data):
    row = Row(data, "prompts.jsonl", 11)
    try:
        prompt = prompt_of(row)
        prompts, report = build_prompts(tokenizer, [row], 5, "truncate")
    except UserError as exc:
        assert "prompts.jsonl, row 11" in str(exc)
        return
    assert isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt))
    assert len(prompts) == 1 and isinstance(prompts[0]["prompt"], str)
    _check_ids(prompts[0]["input_ids"], tokenizer)
    assert len(prompts[0]["input_ids"]) <= 5


# ------------------------------------------------------------------------------------------ overrides

KEYS = [
    "model.name_or_path",
    "model.dtype",
    "model.trust_remote_code",
    "lora.r",
    "lora.alpha",
    "lora.target_modules",
    "lora.enabled",
    "data.train",
    "data.max_length",
    "data.overflow",
    "train.lr",
    "train.max_steps",
    "train.batch_size",
    "train.seed",
    "output_dir",
    "resume",
    "logger.wandb.mode",
    "lora",
    "model",
    "train",
    "nope",
    "train.nope",
    "ppo.kl_coef",
]
override_values = st.one_of(
    st.integers(-5, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "",
            "null",
            "true",
            "abc",
            "[1,2]",
            "{a: 1}",
            "${train.seed}",
            "${oc.env:PPO_CLI_SURELY_UNSET}",
            "${nope}",
            "${",
            "'quoted'",
            "a=b",
            "qwen2.5-0.5b",
            "all-linear",
            "x/y",
        ]
    ),
    st.text(alphabet=st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=12),
)
overrides = st.lists(
    st.builds(
        lambda prefix, key, value: f"{prefix}{key}={value}",
        st.sampled_from(["", "", "", "+", "++"]),
        st.one_of(st.sampled_from(KEYS), st.from_regex(r"[a-z_]{1,6}(\.[a-z_]{1,6}){0,2}", fullmatch=True)),
        override_values,
    )
    | st.sampled_from(["~lora", "~train.lr", "model", "=x", "a b=1"]),
    max_size=4,
)


@SETTINGS
@given(overrides=overrides, stage=st.sampled_from(["train_sft", "train_rm", "train_ppo"]))
def test_overrides_compose_and_resolve_or_exit_2(overrides, stage, capsys):
    """What the CLI does with overrides before any model loads: compose (precheck), then resolve every
    interpolation. Either succeeds, or exits 2 with one paragraph on stderr; never another exception."""
    from ppo_cli.app import precheck, resolve_or_fail

    command = stage.replace("_", "-")
    try:
        cfg = precheck(stage, list(overrides), command)
        resolve_or_fail(cfg, command)
    except SystemExit as exc:
        assert exc.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ppo-cli {command}: error: ") and "\n" not in err, err
        assert "Traceback" not in err
        return
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------- resumable state


@SETTINGS
@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    last=st.sampled_from(["short", "drop", "pad"]),
    stop=st.integers(0, 30),
    more=st.integers(1, 30),
)
def test_epoch_batches_resume_from_any_point(n, batch_size, seed, last, stop, more):
    drop_last, pad_last = last == "drop", last == "pad"
    uninterrupted = EpochBatches(n, batch_size, seed, drop_last, pad_last)
    expected = [uninterrupted.next() for _ in range(stop + more)]

    first = EpochBatches(n, batch_size, seed, drop_last, pad_last)
    for _ in range(stop):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # as stored in trainer_state.json
    resumed = EpochBatches(n, batch_size, seed, drop_last, pad_last)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(more)] == expected[stop:]

    # Every batch is a non-empty slice of one epoch's permutation (padded with the permutation's head
    # under pad_last, which makes every batch full); without drop_last an epoch covers all.
    per_epoch = uninterrupted.batches_per_epoch()
    for epoch in range(len(expected) // per_epoch):
        batches = expected[epoch * per_epoch : (epoch + 1) * per_epoch]
        if pad_last:
            assert all(len(b) == batch_size for b in batches)
            batches[-1] = batches[-1][: n - (per_epoch - 1) * batch_size]
        flat = [i for b in batches for i in b]
        assert all(batches) and len(set(flat)) == len(flat) and set(flat) <= set(range(n))
        if not drop_last:
            assert sorted(flat) == list(range(n))


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    warmup=st.integers(0, 5),
    gauss=st.booleans(),
    draws=st.integers(1, 5),
)
def test_rng_capture_restore_round_trip_through_json(seed, warmup, gauss, draws):
    """Python, numpy (including its cached Gaussian) and torch generators resume exactly from a checkpoint's
    JSON + tensor form, whatever state they were in."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    for _ in range(warmup):
        random.random(), np.random.rand(), torch.rand(1)
    if gauss:
        np.random.standard_normal()  # leaves a cached second Gaussian in numpy's state
    state = ckpt.capture_rng()
    torch_state = state.pop("torch")
    state.pop("cuda")
    stored = json.loads(json.dumps(state))  # what trainer_state.json keeps

    def draw():
        return (
            [random.random() for _ in range(draws)],
            np.random.standard_normal(draws).tolist(),
            torch.randn(draws).tolist(),
            random.getrandbits(64),
        )

    expected = draw()
    for _ in range(3):  # move every generator elsewhere
        draw()
    ckpt.restore_rng(dict(stored, torch=torch_state, cuda=[]))
    assert draw() == expected
