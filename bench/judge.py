"""The quality benchmark's judge: samples policies on held-out prompts and measures them with plain
transformers + peft (no ppo-cli code runs here), so ppo-cli's and TRL's products are judged alike.

For one task the judge loads the SFT policy (the reference) and each PPO policy, samples `n` responses
per held-out prompt at the training temperature (pure sampling: no top-k/top-p; the pad token is never
sampled, as in ppo-cli's and TRL's rollouts), and reports per policy:

- gold: mean gold score of the decoded responses; `gold_lift` = gold - the SFT policy's gold on the same
  prompts (both sampled here, with the same seeds);
- kl: mean over samples of the per-sequence sum of log pi(y_t) - log pi_SFT(y_t) over the response tokens
  (through the EOS), both at the sampling temperature (logits / T): the `objective/kl` PPO optimises;
- rm_win: the share of (prompt, k) for which the reward model scores the policy's k-th response above
  the SFT policy's k-th response to the same prompt (a tie counts one half);
- eos: the share of responses that end with EOS within the token limit;
- distinct2: distinct word bigrams / all word bigrams over the responses (1 = no repeated bigram);
- words: mean number of words per response.

Reward models are sequence classifiers (`AutoModelForSequenceClassification(num_labels=1)` + a LoRA
adapter); a sequence is prompt + response ids (through the EOS), scored at its last non-pad token.
`rm_accuracy` is the share of held-out preference pairs (prompt + answer + EOS) ranked right, ties half.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


@dataclass
class Samples:
    prompts: list[str]  # one per sample (a prompt repeated n times)
    sequences: torch.Tensor  # (N, P+R) left-padded prompt + response, pads after the EOS
    attention_mask: torch.Tensor  # (N, P+R)
    prompt_len: int  # P
    response_mask: torch.Tensor  # (N, R) bool: response tokens through the first EOS
    ended: torch.Tensor  # (N,) bool: the response ends with EOS
    texts: list[str]


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise ValueError(f"{path}: the judge needs a tokenizer with a pad token distinct from EOS")
    return tok


def load_causal(base: str | Path, adapter: str | Path | None):
    """A causal LM: a full model directory (adapter None) or the base + a peft adapter, in fp32, eval."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def load_reward_model(base: str | Path, adapter: str | Path, pad_token_id: int):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = pad_token_id
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def _left_pad(rows: list[list[int]], pad: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(
    model,
    tok,
    prompts: list[str],
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch: int = 64,
) -> Samples:
    """`n` responses per prompt, in batches of `batch` rows; deterministic for a seed."""
    from transformers import GenerationConfig

    eos, pad = tok.eos_token_id, tok.pad_token_id
    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        suppress_tokens=[pad],
    )
    flat = [p for p in prompts for _ in range(n)]
    encoded = [tok(p)["input_ids"] for p in flat]
    width = max(map(len, encoded))
    torch.manual_seed(seed)
    seqs, masks, resp_masks = [], [], []
    for s in range(0, len(flat), batch):
        rows = encoded[s : s + batch]
        ids, mask = _left_pad(rows, pad, width)  # every batch as wide: one prompt_len for all rows
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        resp = out[:, width:]
        resp = torch.nn.functional.pad(resp, (0, max_new_tokens - resp.shape[1]), value=pad)
        is_eos = resp == eos
        no_eos = torch.full_like(resp[:, 0], resp.shape[1])
        first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), no_eos)
        rmask = torch.arange(resp.shape[1]).unsqueeze(0) <= first.unsqueeze(-1)
        resp = resp.masked_fill(~rmask, pad)
        seqs.append(torch.cat([ids, resp], 1))
        masks.append(torch.cat([mask, rmask.long()], 1))
        resp_masks.append(rmask)
    sequences, attention, rmask = torch.cat(seqs), torch.cat(masks), torch.cat(resp_masks)
    responses = sequences[:, width:]
    ended = (responses == eos).logical_and(rmask).any(-1)
    texts = tok.batch_decode(responses.masked_fill(~rmask, pad), skip_special_tokens=True)
    return Samples(flat, sequences, attention, width, rmask, ended, texts)


@torch.no_grad()
def sequence_logprobs(model, s: Samples, temperature: float, pad: int, batch: int = 64) -> torch.Tensor:
    """Per-sequence sum of log softmax(logits / T)[y_t] over the response tokens (pad never sampled)."""
    out = []
    for i in range(0, s.sequences.shape[0], batch):
        ids, mask = s.sequences[i : i + batch], s.attention_mask[i : i + batch]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits.float()
        logits = logits[:, s.prompt_len - 1 : -1] / temperature
        logits[..., pad] = float("-inf")
        resp = ids[:, s.prompt_len :]
        lp = torch.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
        out.append(torch.where(s.response_mask[i : i + batch], lp, torch.zeros_like(lp)).sum(-1))
    return torch.cat(out)


@torch.no_grad()
def reward_scores(rm, ids: torch.Tensor, mask: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Scores of left-padded sequences whose pads after the EOS are pad ids (the classifier pools the
    last non-pad token); positions from the mask."""
    out = []
    for i in range(0, ids.shape[0], batch):
        m = mask[i : i + batch]
        out.append(
            rm(input_ids=ids[i : i + batch], attention_mask=m, position_ids=_positions(m)).logits[:, 0]
        )
    return torch.cat(out).float()


def rm_accuracy(rm, tok, pairs: list[dict[str, Any]]) -> float:
    """Share of pairs whose chosen answer (prompt + answer + EOS) scores higher; a tie counts one half."""
    eos = tok.eos_token_id
    rows = [tok(r["prompt"] + r[side])["input_ids"] + [eos] for r in pairs for side in ("chosen", "rejected")]
    ids, mask = _left_pad(rows, tok.pad_token_id)
    scores = reward_scores(rm, ids, mask).view(-1, 2)
    return float(
        ((scores[:, 0] > scores[:, 1]).float() + 0.5 * (scores[:, 0] == scores[:, 1]).float()).mean()
    )


def distinct_2(texts: list[str]) -> float:
    bigrams = []
    for t in texts:
        words = _WORD_RE.findall(t.lower())
        bigrams += list(zip(words, words[1:]))
    return len(set(bigrams)) / max(1, len(bigrams))


def win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a > b).float() + 0.5 * (a == b).float()).mean())


@dataclass
class Judged:
    samples: Samples
    gold: list[float]
    logprob: torch.Tensor  # under the policy
    ref_logprob: torch.Tensor  # under the SFT policy
    rm: dict[str, torch.Tensor]  # RM name -> scores


def judge_task(
    base: str | Path,
    sft_adapter: str | Path,
    policies: dict[str, tuple[str | Path, str | Path | None]],
    reward_models: dict[str, str | Path],
    prompts: list[str],
    gold,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    eval_pairs: list[dict[str, Any]] | None = None,
    samples_dir: Path | None = None,
) -> dict[str, Any]:
    """Judge the SFT policy and every policy of `policies` (name -> (model dir, adapter or None)).

    Returns {"rm_accuracy": {rm: acc}, "policies": {name: metrics}}; metrics as the module doc says,
    `rm_win` per reward model."""
    tok = load_tokenizer(sft_adapter)
    pad = tok.pad_token_id
    ref = load_causal(base, sft_adapter)
    rms = {name: load_reward_model(base, path, pad) for name, path in reward_models.items()}
    result: dict[str, Any] = {"rm_accuracy": {}, "policies": {}}
    if eval_pairs:
        result["rm_accuracy"] = {name: rm_accuracy(rm, tok, eval_pairs) for name, rm in rms.items()}

    def measure(model) -> Judged:
        s = sample(model, tok, prompts, n, max_new_tokens, temperature, seed)
        lp = sequence_logprobs(model, s, temperature, pad)
        ref_lp = lp if model is ref else sequence_logprobs(ref, s, temperature, pad)
        scores = {name: reward_scores(rm, s.sequences, s.attention_mask) for name, rm in rms.items()}
        return Judged(s, [gold(t) for t in s.texts], lp, ref_lp, scores)

    sft = measure(ref)
    sft_gold = sum(sft.gold) / len(sft.gold)
    for name, (model_dir, adapter) in {"sft": (None, None), **policies}.items():
        if name == "sft":
            j = sft
        else:
            j = measure(load_causal(model_dir, adapter))
        gold_mean = sum(j.gold) / len(j.gold)
        words = [len(_WORD_RE.findall(t.lower())) for t in j.samples.texts]
        metrics = {
            "gold": gold_mean,
            "gold_lift": gold_mean - sft_gold,
            "kl": float((j.logprob - j.ref_logprob).mean()),
            "rm_win": {rm: win_rate(j.rm[rm], sft.rm[rm]) for rm in rms},
            "rm_score": {rm: float(j.rm[rm].mean()) for rm in rms},
            "eos": float(j.samples.ended.float().mean()),
            "distinct2": distinct_2(j.samples.texts),
            "words": sum(words) / len(words),
            "response_tokens": float(j.samples.response_mask.sum(-1).float().mean()),
        }
        result["policies"][name] = metrics
        if samples_dir is not None:
            samples_dir.mkdir(parents=True, exist_ok=True)
            file_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
            with (samples_dir / f"{file_name}.jsonl").open("w") as f:
                for i, text in enumerate(j.samples.texts):
                    row = {"prompt": j.samples.prompts[i], "completion": text, "gold": j.gold[i]}
                    row.update({f"rm_{rm}": float(j.rm[rm][i]) for rm in rms})
                    row["eos"] = bool(j.samples.ended[i])
                    f.write(json.dumps(row) + "\n")
    return result


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
