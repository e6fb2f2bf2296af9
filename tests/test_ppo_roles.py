"""PPO's four roles on one base (ppo_cli/ppo/roles.py), on the tiny Llama, in-process.

Details of docs/ppo-details.md tested here: 1 (pad != eos), 2 (left padding), 4 (reward at the last real token,
equal to the plain peft RM), 9 (dropout off), 10 (critic initialised from the RM), and the role
set-up itself (which weights train, reference = SFT). The adapters are hand-made in
tests/ppo_helpers.py (non-zero LoRA B, random score head), so no other stage is needed.
"""

from __future__ import annotations

import pytest
import torch
from ppo_helpers import build_tiny_roles, load_base, tiny_adapters, tokenizer_of

from ppo_cli import rlhf
from ppo_cli.ppo.roles import POLICY, REFERENCE, REWARD, VALUE, build_roles, disable_dropout

PROMPTS = ["Describe the river:", "How was the morning?", "Tell me about a dog:"]
RESPONSES = [" good happy river.", " sad", " warm bright lovely table window."]


@pytest.fixture(scope="module")
def adapters(tiny):
    return tiny_adapters(tiny)


@pytest.fixture(scope="module")
def roles_and_tokenizer(tiny, adapters):
    return build_tiny_roles(tiny["model"], adapters["sft"], adapters["rm"])


def encode_rows(tokenizer, with_eos: bool = True) -> list[list[int]]:
    eos = [tokenizer.eos_token_id] if with_eos else []
    return [tokenizer(p + r)["input_ids"] + eos for p, r in zip(PROMPTS, RESPONSES)]


def left_padded(rows: list[list[int]], pad: int, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows) + extra
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# -- row 1 -----------------------------------------------------------------------------------------
def test_row1_pad_is_its_own_token(tiny):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(tiny["model"]))
    assert raw.pad_token_id is None  # the tiny tokenizer has none: load_tokenizer must add one
    tokenizer = tokenizer_of(tiny["model"])
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    model = load_base(tiny["model"], tokenizer)
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)  # the new id has a row
    assert model.config.pad_token_id == tokenizer.pad_token_id


# -- role set-up -------------------------------------------------------------------------------------
def test_roles_train_exactly_policy_and_value(roles_and_tokenizer):
    roles, _ = roles_and_tokenizer
    trainable = {n for n, p in roles.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    for name in trainable:
        assert f".{POLICY}." in name or f".{VALUE}." in name or name.startswith("value_head."), name
    assert any(f".{POLICY}." in n for n in trainable) and any(f".{VALUE}." in n for n in trainable)
    assert "value_head.weight" in trainable
    assert not roles.reward_head.weight.requires_grad
    frozen_lora = [
        n
        for n, p in roles.named_parameters()
        if ("lora_" in n and (f".{REFERENCE}." in n or f".{REWARD}." in n)) and p.requires_grad
    ]
    assert frozen_lora == []
    # Switching roles (as the trainer does for every pass) must not change the trainable set.
    with roles.role(REFERENCE), roles.role(REWARD):
        pass
    assert {n for n, p in roles.named_parameters() if p.requires_grad} == trainable
    # Policy and value parameter lists used by the optimizer cover the trainable set exactly once.
    ids = {id(p) for p in roles.policy_parameters() + roles.value_parameters()}
    assert ids == {id(p) for p in roles.parameters() if p.requires_grad}


def test_reference_is_the_sft_adapter_and_policy_starts_there(roles_and_tokenizer):
    """Row 16's premise: at step 0 policy == reference == SFT, and the SFT adapter is not a no-op."""
    roles, tokenizer = roles_and_tokenizer
    ids, mask = left_padded(encode_rows(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        with roles.role(POLICY):
            policy = roles.response_logits(ids, mask, 5)
        with roles.role(REFERENCE):
            reference = roles.response_logits(ids, mask, 5)
        with roles.model.disable_adapter():
            base = roles.response_logits(ids, mask, 5)
        with roles.role(REWARD):
            other = roles.response_logits(ids, mask, 5)
    assert torch.equal(policy, reference)
    assert (policy - base).abs().max() > 1e-2  # the SFT adapter changes the model...
    assert (policy - other).abs().max() > 1e-2  # ...and the roles really switch adapters


# -- row 2 -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_roles(tiny_factory):
    """GPT-2 has absolute position embeddings: wrong position ids under left padding show at once (Llama's
    rotary embeddings are shift-invariant, so there left padding only tests the masking)."""
    return build_tiny_roles(tiny_factory("gpt2")["model"], None, None, targets=None)


@pytest.mark.parametrize("arch,role", [("llama", POLICY), ("llama", REFERENCE), ("gpt2", POLICY)])
def test_row2_left_padding_does_not_change_logprobs(roles_and_tokenizer, gpt2_roles, arch, role):
    roles, tokenizer = roles_and_tokenizer if arch == "llama" else gpt2_roles
    rows = encode_rows(tokenizer)
    pad = tokenizer.pad_token_id
    length = 5  # the last 5 tokens of every row play the response
    labels = torch.tensor([r[-length:] for r in rows])
    with torch.no_grad(), roles.role(role):
        results = []
        for extra in (0, 3, 7):
            ids, mask = left_padded(rows, pad, extra)
            logits = roles.response_logits(ids, mask, length)
            results.append(rlhf.logprobs_from_logits(logits, labels, temperature=0.7))
        alone = torch.cat(
            [
                rlhf.logprobs_from_logits(
                    roles.response_logits(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), length),
                    labels[i : i + 1],
                    temperature=0.7,
                )
                for i, r in enumerate(rows)
            ]
        )
        ids, mask = left_padded(rows, pad, 7)
        naive = roles.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -length - 1 : -1]
    for padded in results:
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    if arch == "gpt2":
        # Positions 0..T-1 instead of cumsum(mask) - 1: the padded rows would be scored wrongly.
        assert (rlhf.logprobs_from_logits(naive, labels, 0.7) - alone).abs().max() > 1e-3


# -- row 4 -----------------------------------------------------------------------------------------
def test_row4_reward_at_last_real_token_equals_plain_peft_rm(tiny, adapters, roles_and_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    roles, tokenizer = roles_and_tokenizer
    rows = encode_rows(tokenizer)  # each ends with EOS: the score is read there
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        ids, mask = left_padded(rows, pad)
        scores = roles.reward_scores(ids, mask)
        # Trailing pads (responses of different lengths in a rollout) must not move the score.
        for extra in (1, 4):
            tail_ids = torch.cat([ids, torch.full((len(rows), extra), pad)], dim=1)
            tail_mask = torch.cat([mask, torch.zeros(len(rows), extra, dtype=mask.dtype)], dim=1)
            torch.testing.assert_close(roles.reward_scores(tail_ids, tail_mask), scores, atol=1e-5, rtol=0)
        # Reading one token too early (before the EOS) gives another number: the index matters.
        early = roles.reward_scores(ids[:, :-1], mask[:, :-1])
        assert (early - scores).abs().min() > 1e-4

        plain = AutoModelForSequenceClassification.from_pretrained(
            str(tiny["model"]), num_labels=1, dtype=torch.float32
        )
        plain = PeftModel.from_pretrained(plain, str(adapters["rm"])).eval()
        # Unpadded rows, one at a time: the plain model needs no pad token for that.
        reference = torch.cat([plain(input_ids=torch.tensor([r])).logits[:, 0] for r in rows])
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)
    assert scores.std() > 1e-3  # a real head, not a constant


# -- row 10 ----------------------------------------------------------------------------------------
def test_row10_critic_starts_as_the_reward_model(roles_and_tokenizer):
    roles, tokenizer = roles_and_tokenizer
    torch.testing.assert_close(roles.value_head.weight, roles.reward_head.weight, atol=0, rtol=0)
    params = dict(roles.model.named_parameters())
    value_lora = {n: p for n, p in params.items() if f".{VALUE}." in n}
    assert value_lora
    for name, param in value_lora.items():
        assert torch.equal(param, params[name.replace(f".{VALUE}.", f".{REWARD}.")]), name

    rows = encode_rows(tokenizer)
    pad = tokenizer.pad_token_id
    ids, mask = left_padded(rows, pad)
    with torch.no_grad():
        rm_scores = roles.reward_scores(ids, mask)
        # values(..., R) reads the hidden states that predict the last R columns; with one pad column
        # appended, the single value is read at the last real token (the EOS), where the RM reads.
        ids1 = torch.cat([ids, torch.full((len(rows), 1), pad)], dim=1)
        mask1 = torch.cat([mask, torch.zeros(len(rows), 1, dtype=mask.dtype)], dim=1)
        value_at_eos = roles.values(ids1, mask1, 1)[:, 0]
        # And at every earlier position, V = the RM's score of that prefix.
        all_values = roles.values(ids, mask, ids.shape[1] - 1)
        prefix = 4
        prefix_scores = roles.reward_scores(ids[:, : prefix + 1], mask[:, : prefix + 1])
    torch.testing.assert_close(value_at_eos, rm_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        all_values[:, prefix][mask[:, prefix].bool()], prefix_scores[mask[:, prefix].bool()]
    )


# -- row 9 -----------------------------------------------------------------------------------------
def _two_passes(model, ids, mask):
    model.train()
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).logits
        second = model(input_ids=ids, attention_mask=mask).logits
    return first, second


def test_row9_dropout_off_in_every_role(tiny, adapters):
    """The SFT adapter was trained with lora dropout 0.05 and the base has attention dropout: in train
    mode two passes must still agree exactly (PPO's ratio starts at 1)."""
    from transformers import AutoModelForCausalLM

    from ppo_cli.models import fit_embeddings

    tokenizer = tokenizer_of(tiny["model"])
    base = AutoModelForCausalLM.from_pretrained(
        str(tiny["model"]), attention_dropout=0.3, dtype=torch.float32
    )
    fit_embeddings(base, tokenizer)
    ids, mask = left_padded(encode_rows(tokenizer), tokenizer.pad_token_id)
    a, b = _two_passes(base, ids, mask)
    assert (a - b).abs().max() > 1e-4  # the check has teeth: dropout is live before build_roles

    from omegaconf import OmegaConf

    lora = OmegaConf.create({"enabled": True, "r": 4, "alpha": 8, "dropout": 0.05, "target_modules": None})
    roles = build_roles(base, lora, str(adapters["sft"]), str(adapters["rm"]), base.config.hidden_size)
    roles.train()
    for role in (POLICY, REFERENCE, REWARD):
        with torch.no_grad(), roles.role(role):
            first = roles.response_logits(ids, mask, 4)
            second = roles.response_logits(ids, mask, 4)
        assert torch.equal(first, second), role
    with torch.no_grad():
        assert torch.equal(roles.values(ids, mask, 4), roles.values(ids, mask, 4))


def test_row9_disable_dropout_covers_gpt2_and_lora_dropout(tiny_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    gpt2 = tiny_factory("gpt2")
    model = AutoModelForCausalLM.from_pretrained(
        str(gpt2["model"]), resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, dtype=torch.float32
    )
    # fan_in_fan_out: GPT-2's layers are Conv1D (peft would warn and set it itself).
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, task_type="CAUSAL_LM", fan_in_fan_out=True)
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.randint(0, 300, (2, 12))
    mask = torch.ones_like(ids)
    a, b = _two_passes(model, ids, mask)
    assert (a - b).abs().max() > 1e-4
    disable_dropout(model)
    a, b = _two_passes(model, ids, mask)
    assert torch.equal(a, b)


# -- the trainable set survives every role switch ----------------------------------------------------
def _trainable(roles) -> set[str]:
    return {n for n, p in roles.named_parameters() if p.requires_grad}


def test_reference_without_sft_adapter_is_the_base_and_keeps_the_trainable_set(tiny, adapters):
    """No SFT adapter (SFT was full fine-tuning, or no sft_checkpoint): the reference is the bare base.
    Running it must not freeze the value adapter (peft's disable_adapter re-enables only "default")."""
    roles, tokenizer = build_tiny_roles(tiny["model"], None, adapters["rm"])
    trainable = _trainable(roles)
    assert any(f".{VALUE}." in n for n in trainable)
    ids, mask = left_padded(encode_rows(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        with roles.role(REFERENCE):
            reference = roles.response_logits(ids, mask, 5)
        base = load_base(tiny["model"], tokenizer).eval()
        plain = base(input_ids=ids, attention_mask=mask, position_ids=rlhf.position_ids_from_mask(mask))
        with roles.role(REWARD):
            other = roles.response_logits(ids, mask, 5)
    # The pad token's output row is drawn afresh by each load (it is new to the tiny vocabulary).
    keep = torch.arange(reference.shape[-1]) != tokenizer.pad_token_id
    torch.testing.assert_close(reference[..., keep], plain.logits[:, -6:-1][..., keep], atol=1e-5, rtol=0)
    assert (reference - other).abs().max() > 1e-2  # the adapters are back on after the reference pass
    lost = trainable - _trainable(roles)
    assert not lost, f"a reference pass froze {len(lost)} trainable parameters, e.g. {sorted(lost)[:2]}"


@pytest.mark.parametrize("with_sft", [True, False])
def test_every_role_leaves_the_trainable_set_as_built(tiny, adapters, with_sft):
    """After any role context exits — nested, left by an exception, or with a peft call inside that
    rewrites requires_grad — exactly the parameters that trained at construction train again."""
    roles, _ = build_tiny_roles(tiny["model"], adapters["sft"] if with_sft else None, adapters["rm"])
    trainable = _trainable(roles)
    for role in (POLICY, REFERENCE, REWARD, VALUE):
        with roles.role(role):
            pass
        assert _trainable(roles) == trainable, role
        with roles.role(role), roles.role(REFERENCE), roles.role(VALUE):
            pass
        assert _trainable(roles) == trainable, role
        with pytest.raises(RuntimeError), roles.role(role):
            raise RuntimeError("a failed pass")
        assert _trainable(roles) == trainable, role
        with roles.role(role), roles.model.disable_adapter():
            pass
        assert _trainable(roles) == trainable, role


# -- the critic on PPO's score scale -----------------------------------------------------------------
def test_normalize_head_hand_computed():
    """w' = w / std, b' = (b - mean) / std: the head's outputs become normalize_scores(outputs)."""
    from ppo_cli.ppo.roles import normalize_head

    weight, bias = torch.tensor([[2.0, -4.0, 1.0]]), torch.tensor([3.0])
    new_weight, new_bias = normalize_head(weight, bias, mean=1.0, std=2.0)
    torch.testing.assert_close(new_weight, torch.tensor([[1.0, -2.0, 0.5]]))
    torch.testing.assert_close(new_bias, torch.tensor([1.0]))
    hidden = torch.tensor([[1.0, 1.0, 2.0], [0.0, -1.0, 4.0]])  # raw outputs 3 and 11
    torch.testing.assert_close(hidden @ new_weight.T + new_bias, torch.tensor([[1.0], [5.0]]))
    torch.testing.assert_close(
        hidden @ new_weight.T + new_bias, rlhf.normalize_scores(hidden @ weight.T + bias, 1.0, 2.0)
    )
    # A head without a bias (Llama's score head) gets one: the mean has to go somewhere.
    new_weight, new_bias = normalize_head(weight, None, mean=2.0, std=4.0)
    torch.testing.assert_close(new_weight, torch.tensor([[0.5, -1.0, 0.25]]))
    torch.testing.assert_close(new_bias, torch.tensor([-0.5]))
    # The inputs are left alone (the head is rewritten by copying, once).
    assert weight.tolist() == [[2.0, -4.0, 1.0]] and bias.tolist() == [3.0]
