"""ppo_cli.data: loading rows from every supported source, SFT tokenization and label masks, length
limits, and a data order that resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ppo_cli.data import (
    IGNORE_INDEX,
    EpochBatches,
    Row,
    build_sft_examples,
    encode_sft_row,
    load_rows,
    prompt_of,
)
from ppo_cli.errors import UserError
from ppo_cli.tiny.tokenizer import EOS_TOKEN, IM_END


@pytest.fixture(scope="module")
def tok(tiny):
    """The tiny tokenizer as every stage loads it (a pad token added, distinct from EOS)."""
    from ppo_cli.models import load_tokenizer

    return load_tokenizer(str(tiny["model"]))


def row(**data) -> Row:
    return Row(data, "mem.jsonl", 1)


def labelled_spans(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded text of each maximal run of positions that carry a label."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tok.decode(s) for s in spans]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------- SFT formats


def test_prompt_completion_labels_only_the_completion_and_eos(tok):
    prompt, completion = "Describe the river:", " good river sad."
    ids, labels = encode_sft_row(tok, row(prompt=prompt, completion=completion))
    prompt_ids = tok(prompt)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
    assert ids == prompt_ids + completion_ids + [tok.eos_token_id]
    assert len(labels) == len(ids)
    n = len(prompt_ids)
    assert labels[:n] == [IGNORE_INDEX] * n  # no loss on the prompt
    assert labels[n:] == ids[n:]  # completion labels are the completion's own ids ...
    assert labels[-1] == tok.eos_token_id  # ... ending with EOS, so the model learns to stop
    assert tok.decode(labels[n:]) == completion + EOS_TOKEN


def test_prompt_completion_does_not_double_an_eos_already_there(tok):
    ids, labels = encode_sft_row(tok, row(prompt="Describe the river:", completion=" good." + EOS_TOKEN))
    assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id
    assert labels[-1] == tok.eos_token_id


def test_messages_label_only_assistant_turns(tok):
    messages = [
        {"role": "user", "content": "Describe the river:"},
        {"role": "assistant", "content": "good river."},
    ]
    ids, labels = encode_sft_row(tok, row(messages=messages))
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    # The assistant's words and the token that ends its turn; not the user turn, not "<|im_start|>assistant\n",
    # not the template's newline after <|im_end|>.
    assert labelled_spans(tok, ids, labels) == ["good river." + IM_END]
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in labelled)
    assert "Describe" not in tok.decode([ids[i] for i in labelled])


def test_messages_multi_turn_labels_both_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Describe the river:"},
        {"role": "assistant", "content": "good river."},
        {"role": "user", "content": "And the cat?"},
        {"role": "assistant", "content": "sad cat."},
    ]
    ids, labels = encode_sft_row(tok, row(messages=messages))
    assert labelled_spans(tok, ids, labels) == ["good river." + IM_END, "sad cat." + IM_END]
    unlabelled = tok.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    for text in ("Be brief.", "Describe the river:", "And the cat?", "<|im_start|>assistant\n"):
        assert text in unlabelled


def test_conversational_prompt_completion_labels_only_the_completion(tok):
    prompt = [
        {"role": "user", "content": "Describe the river:"},
        {"role": "assistant", "content": "calm river."},  # a few-shot turn inside the prompt: no loss
        {"role": "user", "content": "And the cat?"},
    ]
    completion = [{"role": "assistant", "content": "sad cat."}]
    ids, labels = encode_sft_row(tok, row(prompt=prompt, completion=completion))
    assert labelled_spans(tok, ids, labels) == ["sad cat." + IM_END]


def test_messages_without_assistant_turn_is_an_error(tok):
    with pytest.raises(UserError, match="no assistant turn"):
        encode_sft_row(tok, row(messages=[{"role": "user", "content": "hi"}]))


def test_text_rows_label_every_token(tok):
    ids, labels = encode_sft_row(tok, row(text="good river sad."))
    assert labels == ids
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "good river sad." + EOS_TOKEN


def test_build_sft_examples_mixes_formats(tok):
    rows = [
        row(prompt="Describe the river:", completion=" good."),
        row(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good."}]),
        row(text="good river."),
    ]
    examples, report = build_sft_examples(tok, rows, max_length=512, overflow="truncate")
    assert [encode_sft_row(tok, r) for r in rows] == [(e["input_ids"], e["labels"]) for e in examples]
    assert (report.total, report.truncated, report.dropped) == (3, 0, 0)
    assert report.describe(512) is None


# ------------------------------------------------------------------------------------- length limits


def test_truncation_and_drop_counts(tok):
    long_completion = " " + " ".join(["good river sad"] * 20) + "."
    rows = [
        Row({"prompt": "Describe the river:", "completion": " good."}, "f.jsonl", 1),  # fits
        Row({"prompt": "Describe the river:", "completion": long_completion}, "f.jsonl", 2),  # too long
        Row({"prompt": " ".join(["Describe the river:"] * 20), "completion": " good."}, "f.jsonl", 3),
    ]
    max_length = 16
    full = [encode_sft_row(tok, r) for r in rows]
    assert len(full[0][0]) <= max_length < len(full[1][0]) and len(full[2][0]) > max_length

    examples, report = build_sft_examples(tok, rows, max_length=max_length, overflow="truncate")
    # Row 2 is cut to max_length; row 3's prompt alone fills max_length, so nothing is left to learn: dropped.
    assert (report.total, report.truncated, report.dropped) == (3, 1, 1)
    assert len(examples) == 2
    assert examples[0]["input_ids"] == full[0][0]
    assert examples[1]["input_ids"] == full[1][0][:max_length]
    assert examples[1]["labels"] == full[1][1][:max_length]
    message = report.describe(max_length)
    assert "1 of 3 examples truncated to data.max_length=16 (f.jsonl row 2)" in message, message
    assert "1 of 3 examples dropped: the prompt alone is at least data.max_length=16 tokens" in message

    examples, report = build_sft_examples(tok, rows, max_length=max_length, overflow="drop")
    assert (report.total, report.truncated, report.dropped) == (3, 0, 2)
    assert [e["input_ids"] for e in examples] == [full[0][0]]


# -------------------------------------------------------------------------------------- data order


@pytest.mark.parametrize("stop_after", [1, 3, 4, 9])
def test_epoch_batches_resume_matches_uninterrupted(stop_after):
    n, batch_size, seed, total = 10, 3, 7, 14  # 4 batches per epoch: 14 batches cross 3 epoch boundaries
    uninterrupted = EpochBatches(n, batch_size, seed)
    expected = [uninterrupted.next() for _ in range(total)]

    first = EpochBatches(n, batch_size, seed)
    got = [first.next() for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = EpochBatches(n, batch_size, seed)
    resumed.load_state_dict(state)
    got += [resumed.next() for _ in range(total - stop_after)]
    assert got == expected


def test_epoch_batches_cover_each_epoch_and_reshuffle():
    batches = EpochBatches(10, 3, seed=1)
    epochs = [[i for _ in range(4) for i in batches.next()] for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))  # every example once per epoch, last batch short
    assert epochs[0] != epochs[1]
    other = EpochBatches(10, 3, seed=2)
    assert [i for _ in range(4) for i in other.next()] != epochs[0]


def test_epoch_batches_pad_last_keeps_every_batch_full():
    # 5 examples, global batch 4 (2 ranks x 2): an epoch's orders are [4, 0, 1, 3, 2] then [0, 4, 2, 3, 1].
    batches = EpochBatches(5, 4, seed=0, pad_last=True)
    assert batches._order(0) == [4, 0, 1, 3, 2] and batches._order(1) == [0, 4, 2, 3, 1]
    got = [batches.next() for _ in range(4)]
    # The epoch's last batch [2] is topped up from the start of the same order (no example twice in a
    # batch while the data holds a full batch); the next epoch starts its own order from the top.
    assert got == [[4, 0, 1, 3], [2, 4, 0, 1], [0, 4, 2, 3], [1, 0, 4, 2]]
    assert all([b[0::2], b[1::2]] and len(b[0::2]) == len(b[1::2]) == 2 for b in got)  # equal rank slices
    # Resume mid-epoch: the same batches as the uninterrupted run.
    resumed = EpochBatches(5, 4, seed=0, pad_last=True)
    resumed.load_state_dict({"epoch": 0, "offset": 1})
    assert [resumed.next() for _ in range(3)] == got[1:]
    # Fewer examples than a batch: the order repeats until the batch is full (order [2, 1, 0]).
    assert EpochBatches(3, 8, seed=3, pad_last=True).next() == [2, 1, 0, 2, 1, 0, 2, 1]
    with pytest.raises(ValueError):
        EpochBatches(5, 4, seed=0, drop_last=True, pad_last=True)


# ------------------------------------------------------------------------------------------ loading

ROWS = [
    {"prompt": "Describe the river:", "completion": " good river."},
    {"prompt": "How was the day?", "completion": " sad day."},
    {"prompt": "Write about the cat:", "completion": " happy cat."},
]


def test_jsonl_rows_keep_file_and_row_number(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    path.write_text(path.read_text() + "\n")  # a trailing blank line is fine
    rows = load_rows(str(path), "data.train")
    assert [r.data for r in rows] == ROWS
    assert [r.where() for r in rows] == [f"{path}, row {i}" for i in (1, 2, 3)]


def test_json_array_csv_parquet(tmp_path):
    import pandas as pd

    array = tmp_path / "train.json"
    array.write_text(json.dumps(ROWS, indent=2))
    lines = write_jsonl(tmp_path / "lines.json", ROWS)  # JSON lines with a .json suffix
    csv = tmp_path / "train.csv"
    pd.DataFrame(ROWS).to_csv(csv, index=False)
    parquet = tmp_path / "train.parquet"
    pd.DataFrame(ROWS).to_parquet(parquet)
    for path in (array, lines, csv, parquet):
        rows = load_rows(str(path), "data.train")
        assert [r.data for r in rows] == ROWS, path
        assert rows[2].where() == f"{path}, row 3"


def test_a_list_of_files_is_concatenated(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[2:])
    rows = load_rows([str(a), str(b)], "data.train")
    assert [r.data for r in rows] == ROWS
    assert [r.where() for r in rows] == [f"{a}, row 1", f"{a}, row 2", f"{b}, row 1"]


def test_local_folder_of_files_loads_through_datasets(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", ROWS[:2])
    write_jsonl(folder / "part-1.jsonl", ROWS[2:])
    rows = load_rows(str(folder), "data.train")
    assert sorted(json.dumps(r.data, sort_keys=True) for r in rows) == sorted(
        json.dumps(r, sort_keys=True) for r in ROWS
    )
    assert rows[0].where() == f"{folder}[train], row 1"


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [r.data for r in load_rows(str(tmp_path / "saved"), "data.train")] == ROWS
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    assert [r.data for r in load_rows(str(tmp_path / "saved_dict"), "data.train")] == ROWS
    assert [r.data for r in load_rows(str(tmp_path / "saved_dict"), "data.eval", split="test")] == ROWS[:1]
    with pytest.raises(UserError, match="data.eval=.*saved_dict.*validation"):
        load_rows(str(tmp_path / "saved_dict"), "data.eval", split="validation")


def test_loading_errors_name_the_key_file_and_line(tmp_path):
    with pytest.raises(UserError, match=r"data\.train=.*missing\.jsonl: file not found"):
        load_rows(str(tmp_path / "missing.jsonl"), "data.train")

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + "{not json\n")
    with pytest.raises(UserError, match=rf"data\.train: {bad}, line 2 is not valid JSON"):
        load_rows(str(bad), "data.train")

    scalar = tmp_path / "scalars.json"
    scalar.write_text("[1, 2]")
    with pytest.raises(UserError, match="row 1 is a int, not a JSON object"):
        load_rows(str(scalar), "data.eval")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        load_rows(str(empty), "data.train")

    other = tmp_path / "train.txt"
    other.write_text("hello")
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        load_rows(str(other), "data.train")


def test_sft_row_missing_fields_name_file_row_and_field(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], {"prompt": "only a prompt"}, {"foo": 1}])
    rows = load_rows(str(path), "data.train")
    with pytest.raises(UserError, match=rf"{path}, row 2: missing field 'completion'"):
        build_sft_examples(tok, rows[:2], 512, "truncate")
    with pytest.raises(UserError, match=rf"{path}, row 3: missing field.*'prompt'.*'messages'.*'text'"):
        build_sft_examples(tok, rows[2:], 512, "truncate")


@pytest.mark.parametrize("field", ["prompt", "messages"])
def test_a_prompt_conversation_ending_with_an_assistant_turn_is_an_error(field):
    conversation = [
        {"role": "user", "content": "Describe the river:"},
        {"role": "assistant", "content": "calm."},
    ]
    row = Row({field: conversation}, "prompts.jsonl", 3)
    with pytest.raises(
        UserError, match=rf"prompts.jsonl, row 3: field '{field}' ends with an assistant turn"
    ):
        prompt_of(row)
    row.data[field] = conversation[:1]
    assert prompt_of(row) == conversation[:1]
