"""`ppo-cli train-rm`: preference rows -> token sequences, and end-to-end runs of the real CLI on the tiny model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ppo_cli.config import RMConfig
from ppo_cli.data import Row, load_rows
from ppo_cli.errors import UserError
from ppo_cli.models import load_tokenizer, write_product_info
from ppo_cli.reward.scoring import sequence_scores
from ppo_cli.reward.stats import load_rm_stats
from ppo_cli.rm.pairs import build_pair_examples, collate_pairs, encode_pair
from ppo_cli.tiny.task import NEUTRAL_WORDS, all_prompts

SPECIAL = "wonderful"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def separable_rows(n: int, seed: int) -> list[dict]:
    """Chosen = a neutral sentence with the special word inserted; rejected = the same sentence with a
    neutral word there instead. Trivially separable, yet the word sits anywhere in the answer."""
    rng = random.Random(seed)
    prompts = all_prompts()
    rows = []
    for _ in range(n):
        words = [rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(3, 6))]
        at = rng.randint(0, len(words))
        chosen = [*words[:at], SPECIAL, *words[at:]]
        rejected = [*words[:at], rng.choice(NEUTRAL_WORDS), *words[at:]]
        rows.append(
            {
                "prompt": rng.choice(prompts),
                "chosen": " " + " ".join(chosen),
                "rejected": " " + " ".join(rejected),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Encoding preference rows


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return load_tokenizer(str(tiny["model"]))


def row(data: dict, index: int = 1) -> Row:
    return Row(data, "prefs.jsonl", index)


def ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def test_text_rows_with_and_without_prompt(tokenizer):
    eos = tokenizer.eos_token_id
    pair = encode_pair(
        tokenizer, row({"prompt": "Describe the river:", "chosen": " good calm", "rejected": " bad"})
    )
    prompt = ids(tokenizer, "Describe the river:", True)
    assert pair["chosen"] == prompt + ids(tokenizer, " good calm", False) + [eos]
    assert pair["rejected"] == prompt + ids(tokenizer, " bad", False) + [eos]
    assert pair["margin"] is None
    implicit = encode_pair(tokenizer, row({"chosen": "Say: good", "rejected": "Say: bad", "margin": 2}))
    assert implicit["chosen"] == ids(tokenizer, "Say: good", True) + [eos]
    assert implicit["margin"] == 2.0


def test_conversation_rows_go_through_the_chat_template(tokenizer):
    prompt = [{"role": "user", "content": "Describe the river:"}]
    chosen = [{"role": "assistant", "content": "good calm"}]
    rejected = [{"role": "assistant", "content": "bad"}]
    pair = encode_pair(tokenizer, row({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
    rendered = tokenizer.apply_chat_template([*prompt, *chosen], tokenize=False)
    # Up to the <|im_end|> that closes the answer, where PPO's response stops (tests/test_templates.py);
    # the template's newline after it is not part of the scored sequence.
    assert rendered.endswith("<|im_end|>\n")
    expected = ids(tokenizer, rendered[: -len("\n")], False)
    assert pair["chosen"] == expected
    implicit = encode_pair(tokenizer, row({"chosen": [*prompt, *chosen], "rejected": [*prompt, *rejected]}))
    assert implicit["chosen"] == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, "prefs.jsonl, row 3: missing field 'rejected'"),
        ({"prompt": "p", "rejected": "a"}, "prefs.jsonl, row 3: missing field 'chosen'"),
        ({"chosen": "a", "rejected": 5}, "row 3: field 'rejected' must be a string or a list"),
        (
            {"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"},
            "row 3: fields prompt",
        ),
        ({"chosen": "a", "rejected": "b", "margin": "big"}, "row 3: field 'margin' must be a finite number"),
    ],
)
def test_bad_rows_name_the_file_row_and_field(tokenizer, data, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        encode_pair(tokenizer, row(data, 3))


def test_length_limit_truncates_keeping_the_start_or_drops(tokenizer):
    rows = [
        row({"prompt": "Describe the river:", "chosen": " good " * 20, "rejected": " bad"}, 1),
        row({"prompt": "Hi:", "chosen": " good", "rejected": " bad"}, 2),
        row(
            {"prompt": "table " * 30, "chosen": " good", "rejected": " bad"}, 3
        ),  # the prompt alone is too long
    ]
    full = encode_pair(tokenizer, rows[0])["chosen"]
    kept, report = build_pair_examples(tokenizer, rows, max_length=12, overflow="truncate")
    assert (
        len(kept) == 2
        and kept[0]["chosen"] == full[:12]
        and kept[0]["rejected"] == encode_pair(tokenizer, rows[0])["rejected"]
    )
    assert (report.total, report.truncated, report.dropped) == (3, 1, 1)
    message = report.describe(12, "pairs")
    assert "1 of 3 pairs truncated to data.max_length=12" in message, message
    assert "1 of 3 pairs dropped: the prompt, with any start both answers share, is at least" in message
    kept, report = build_pair_examples(tokenizer, rows, max_length=12, overflow="drop")
    assert len(kept) == 1 and (report.truncated, report.dropped) == (0, 2)


def test_collate_puts_chosen_then_rejected_in_one_batch():
    examples = [
        {"chosen": [1, 2, 3], "rejected": [4], "margin": None},
        {"chosen": [5], "rejected": [6, 7], "margin": 1.5},
    ]
    batch = collate_pairs(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 0, 0], [4, 0, 0], [6, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert batch["margin"].tolist() == [0.0, 1.5]


# ---------------------------------------------------------------------------------------------
# End to end through the CLI


@pytest.fixture(scope="module")
def separable(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rm-data")
    return {
        "train": write_jsonl(root / "train.jsonl", separable_rows(256, seed=0)),
        "eval": write_jsonl(root / "eval.jsonl", separable_rows(64, seed=1)),
    }


def make_sft_product(base: Path, out: Path) -> Path:
    """A train-sft final/ (peft CausalLM adapter, r=4, with non-zero LoRA weights; tokenizer; ppo_cli.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(base))
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(0)
    sft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    sft.save_pretrained(out, save_embedding_layers=False)  # as train-sft writes it
    tokenizer.save_pretrained(out)
    write_product_info(out, "sft", str(base), lora=True)
    return out


@pytest.fixture(scope="module")
def rm_run(tiny, separable, tmp_path_factory):
    """The pipeline's way: train-rm from an SFT product, model.name_or_path left for it to fill."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("rm-run")
    sft = make_sft_product(tiny["model"], root / "sft-final")
    out = root / "run"
    result = run_cli(
        "train-rm",
        f"sft_checkpoint={sft}",
        f"data.train={separable['train']}",
        f"data.eval={separable['eval']}",
        "data.max_length=64",
        "train.lr=3e-3",
        "train.max_steps=12",
        "train.batch_size=8",
        "train.log_every=3",
        "train.eval_every=6",
        "train.save_every=6",
        "logger.progress=false",
        "logger.plots=false",
        f"output_dir={out}",
        env={"COLUMNS": "80"},  # and stdout a pipe: see test_console_at_80_columns
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, sft, result


def run_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`ppo-cli ARGS` through the real dispatcher, in this process (no interpreter start-up): (exit code, stderr)."""
    from ppo_cli import cli

    monkeypatch.setattr("sys.argv", ["ppo-cli", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    return exc.value.code, capsys.readouterr().err


def test_learns_a_separable_preference(rm_run):
    out, _, result = rm_run
    panel = " ".join(result.stdout.replace("│", " ").split())  # the 80-column panel folds long rows
    assert "SFT adapter" in panel and "(8 LoRA tensors)" in panel, result.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [3, 6, 9, 12]
    for m in train_lines:
        for key in (
            "loss",
            "accuracy",
            "lr",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margin",
            "rewards/mean",
            "rewards/std",
        ):
            assert key in m and math.isfinite(m[key]), key
    evals = [m for m in lines if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [6, 12] and all("eval/loss" in m for m in evals)
    assert evals[-1]["eval/accuracy"] >= 0.9, evals
    assert evals[-1]["eval/rewards/margin"] > 0
    # The health report: held-out accuracy with its interval, in the console and in final/ppo_cli.json.
    info = json.loads((out / "final" / "ppo_cli.json").read_text())
    assert info["eval_accuracy"] == pytest.approx(evals[-1]["eval/accuracy"])
    n_eval = len(separable_eval_rows(out))
    low, high = info["eval_accuracy_ci95"]
    assert info["eval_pairs"] == n_eval and low < info["eval_accuracy"] <= high
    assert f"reward model: held-out accuracy {info['eval_accuracy']:.3f}" in " ".join(result.stdout.split())
    assert math.isfinite(info["late_train_loss"])


def test_console_at_80_columns(rm_run):
    """The same compact LoRA line as train-sft's, final/ whole on its own line, and how accuracy and held-out
    accuracy moved from their first to their last log."""
    out, _, result = rm_run
    assert f"final: {out / 'final'}" in result.stdout.splitlines(), result.stdout
    assert "…" not in result.stdout, result.stdout
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "targets=peft default for llama (q_proj, v_proj)" in text, result.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m["accuracy"] for m in lines if "accuracy" in m]
    evals = [m["eval/accuracy"] for m in lines if "eval/accuracy" in m]
    assert f"accuracy {train[0]:.4g} -> {train[-1]:.4g} (step 3 -> 12)" in text, result.stdout
    assert f"eval/accuracy {evals[0]:.4g} -> {evals[-1]:.4g} (step 6 -> 12)" in text, result.stdout


def separable_eval_rows(out) -> list[str]:
    import yaml

    eval_file = yaml.safe_load((out / "config.yaml").read_text())["data"]["eval"]
    return Path(eval_file).read_text().splitlines()


def test_output_tree(rm_run, tiny):
    out, sft, _ = rm_run
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")) == [
        "step-000006",
        "step-000012",
    ]
    final = out / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "ppo_cli.json"):
        assert (final / name).is_file(), name
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    from safetensors.torch import load_file

    saved = load_file(final / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in saved  # the head, saved with the adapter
    assert all(".lora_" in k or ".score." in k for k in saved), sorted(saved)  # no (resized) embeddings
    info = json.loads((final / "ppo_cli.json").read_text())
    assert info["stage"] == "rm" and info["base_model"] == str(tiny["model"])  # filled from the SFT product
    assert info["sft_checkpoint"] == str(sft)
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)  # the SFT adapter's shape, not lora.r=16
    mean, std = load_rm_stats(final)
    assert (mean, std) == (info["reward_mean"], info["reward_std"]) and math.isfinite(mean) and std > 0


def test_final_loads_with_plain_transformers_and_peft(rm_run, tiny, separable):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ppo_cli.models import load_sequence_classifier

    out, _, _ = rm_run
    final = out / "final"
    rows = load_rows(str(separable["eval"]), "data.eval")[:6]
    examples, _ = build_pair_examples(load_tokenizer(str(final)), rows, 64, "truncate")
    tok = AutoTokenizer.from_pretrained(final)
    batch = collate_pairs(examples, tok.pad_token_id)  # right-padded: 6 chosen, then 6 rejected
    sequences = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]

    # The README's load, word for word; one unpadded sequence at a time.
    plain = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=1), final
    ).eval()
    with torch.no_grad():
        alone = torch.stack([plain(input_ids=torch.tensor([s])).logits[0, 0] for s in sequences])
    assert (alone[:6] > alone[6:]).float().mean() >= 5 / 6  # the trained head came with the adapter

    # Plain batches with the saved tokenizer's pad token (peft's recipe for an added token: resize
    # the base first) read the logit at the last non-pad token: the same scores.
    base = AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=1)
    base.resize_token_embeddings(len(tok))
    base.config.pad_token_id = tok.pad_token_id
    padded = PeftModel.from_pretrained(base, final).eval()
    with torch.no_grad():
        batched = padded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)

    # Ours: ppo-cli's loader + sequence_scores on the right-padded batch.
    cfg = OmegaConf.structured(RMConfig)
    cfg.model.name_or_path, cfg.model.dtype = str(tiny["model"]), "float32"
    ours_model = PeftModel.from_pretrained(
        load_sequence_classifier(cfg.model, load_tokenizer(str(final)), torch.device("cpu")), final
    ).eval()
    with torch.no_grad():
        ours = sequence_scores(ours_model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours, alone.float(), atol=1e-5, rtol=1e-5)


def test_bad_row_exits_2_naming_file_and_row(tiny, tmp_path, monkeypatch, capsys):
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}],
    )
    code, err = run_in_process(
        monkeypatch,
        capsys,
        "train-rm",
        f"model.name_or_path={tiny['model']}",
        f"data.train={bad}",
        f"output_dir={tmp_path / 'out'}",
        "logger.progress=false",
        "logger.plots=false",
    )
    assert code == 2, err
    assert str(bad) in err and "row 2" in err and "'rejected'" in err and "Traceback" not in err


def test_sft_checkpoint_must_be_an_sft_product(rm_run, separable, tmp_path, monkeypatch, capsys):
    out, _, _ = rm_run
    code, err = run_in_process(
        monkeypatch,
        capsys,
        "train-rm",
        f"sft_checkpoint={out / 'final'}",
        f"data.train={separable['train']}",
        f"output_dir={tmp_path / 'out'}",
    )
    assert code == 2, err
    assert "product of the rm stage, not of the sft stage" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
