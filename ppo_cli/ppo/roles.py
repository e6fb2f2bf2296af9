"""PPO's four roles on ONE frozen base model, as peft adapters (README, "PPO: one base model, four roles").

| role      | on the shared base                                   | trainable |
|-----------|------------------------------------------------------|-----------|
| policy    | adapter "default", initialised from the SFT adapter  | yes       |
| reference | adapter "reference" = the SFT adapter (or no adapter)| no        |
| reward    | adapter "reward" + score head, from the RM           | no        |
| value     | adapter "value" + value head, from the RM            | yes       |

The policy adapter is called "default" so that `final/` is a plain peft adapter directory.
Switching roles only changes which adapter the LoRA layers use (or switches them off, for a reference
without an adapter); it never touches `requires_grad`. peft's own `set_adapter` and `disable_adapter`
would: both end by freezing every adapter but the active one, which would silently stop the value
adapter training. Leaving a role also puts back the trainable set as built, whatever ran inside it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from ppo_cli import fsdp, sampling
from ppo_cli.errors import UserError
from ppo_cli.models import (
    has_conv1d_layers,
    keep_4bit_differentiable,
    keep_trainable_in_fp32,
    peft_lora_config,
)
from ppo_cli.reward.scoring import head_scores
from ppo_cli.rlhf import position_ids_from_mask

POLICY, REFERENCE, REWARD, VALUE = "default", "reference", "reward", "value"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


_DROPOUT_ATTRS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout changes logprobs between passes, so PPO's ratio would not start at 1 (docs/ppo-details.md, detail 9).

    Besides nn.Dropout modules, attention layers keep their dropout probability as a plain float read
    from the config at construction (e.g. LlamaAttention.attention_dropout, passed to SDPA as dropout_p
    in train mode): those attributes are zeroed on every module, not only in the config.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in _DROPOUT_ATTRS:
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
        config = getattr(module, "config", None)
        for attr in _DROPOUT_ATTRS:
            if isinstance(getattr(config, attr, None), float):
                setattr(config, attr, 0.0)


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook for the output head: `logits_to_keep` hands it a strided slice of the hidden
    states, and a Linear on a non-contiguous 3-D input runs as a batched matmul against an expanded
    weight, about twice slower on CPU (forward and backward) than the plain matmul it gets after one
    small copy."""
    return (args[0].contiguous(), *args[1:])


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, adapter tensors) of a saved peft adapter."""
    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{path} has no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded).")
    return config, load_file(weights)


def lora_config_from(adapter_config: dict, task_type: str = "CAUSAL_LM"):
    """A fresh LoraConfig with the shape of a saved adapter, dropout 0, no modules_to_save."""
    from peft import LoraConfig

    targets = adapter_config.get("target_modules")
    if isinstance(targets, list):
        targets = sorted(targets)
    return LoraConfig(
        r=adapter_config["r"],
        lora_alpha=adapter_config["lora_alpha"],
        lora_dropout=0.0,
        target_modules=targets,
        task_type=task_type,
        use_rslora=adapter_config.get("use_rslora", False),
        bias=adapter_config.get("bias", "none"),
        # True for adapters on GPT-2-style Conv1D layers (see models.has_conv1d_layers).
        fan_in_fan_out=adapter_config.get("fan_in_fan_out", False),
    )


def head_name_of(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> str | None:
    """The score head saved with an RM adapter (peft modules_to_save), e.g. 'score'."""
    for name in adapter_config.get("modules_to_save") or []:
        if any(k.split(".")[-2] == name or f".{name}." in k for k in tensors):
            return name
    return None


def split_head(
    tensors: dict[str, torch.Tensor], head: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate LoRA tensors from the head's (keys 'base_model.model.<head>.weight' / '.bias')."""
    if head is None:
        return tensors, {}
    lora, head_tensors = {}, {}
    for key, value in tensors.items():
        parts = key.split(".")
        if head in parts and "lora_" not in key:
            head_tensors[parts[-1]] = value
        else:
            lora[key] = value
    return lora, head_tensors


def normalize_head(
    weight: torch.Tensor, bias: torch.Tensor | None, mean: float, std: float, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a linear head whose outputs are `normalize_scores(outputs, mean, std)` of the
    given head's: w' = w / (std + eps), b' = (b - mean) / (std + eps), a missing bias counting as 0.

    The critic starts as a copy of the RM head, on the RM's raw scale, while GAE's returns are built
    from the normalised scores; on the raw scale every value would start |mean| / std off its return.
    """
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return weight / (std + eps), (bias - mean) / (std + eps)


class Roles(torch.nn.Module):
    """The peft model with the four role adapters, plus the value and reward heads.

    Under train.strategy=fsdp this module is the root of the sharded base (ppo_cli/fsdp.py): every pass
    enters through one of FSDP_FORWARD_METHODS, around which FSDP gathers the root's parameters
    (embeddings, output and value/reward heads), and the decoder layers gather their own in turn.
    """

    # The methods through which passes reach the base (none calls another of them).
    FSDP_FORWARD_METHODS = ("response_logits", "values", "reward_scores", "generate")

    def __init__(
        self,
        peft_model,
        value_head: torch.nn.Linear | None,
        reward_head: torch.nn.Linear | None,
        has_reference_adapter: bool,
    ):
        super().__init__()
        self.model = peft_model
        self.value_head = value_head
        self.reward_head = reward_head
        self.has_reference_adapter = has_reference_adapter
        # The critic on the RM's raw scale (a copy of its head) rather than at zero.
        self.value_head_from_reward = reward_head is not None and value_head is not None
        causal_lm = peft_model.get_base_model()
        self.trunk = getattr(causal_lm, causal_lm.base_model_prefix)
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._lora_layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
        self._requires_grad = [(p, p.requires_grad) for p in self.parameters()]
        # Sharded, generate runs as many forward passes on every rank (FSDP's gathers are collectives).
        self.synced_generation = False
        output_head = causal_lm.get_output_embeddings()
        if output_head is not None:
            output_head.register_forward_pre_hook(_contiguous_input)

    # -- role switching --------------------------------------------------------------------------
    @contextlib.contextmanager
    def role(self, name: str) -> Iterator[None]:
        """Run the enclosed forward passes as `name` (POLICY, REFERENCE, REWARD, VALUE)."""
        # Without an SFT adapter the reference is the bare base: the LoRA layers are switched off
        # through their own flag (what peft's disable_adapter does, minus its requires_grad changes).
        bare = name == REFERENCE and not self.has_reference_adapter
        previous = [(layer._active_adapter, layer._disable_adapters) for layer in self._lora_layers]
        for layer in self._lora_layers:
            if not bare:
                layer._active_adapter = [name]
            layer._disable_adapters = bare
        try:
            yield
        finally:
            for layer, (active, disabled) in zip(self._lora_layers, previous):
                layer._active_adapter, layer._disable_adapters = active, disabled
            self._restore_requires_grad()

    def after_sharding(self) -> None:
        """fsdp.shard replaced every parameter by its shard: remember the new ones' flags, and keep the
        ranks' generate loops in step."""
        self._requires_grad = [(p, p.requires_grad) for p in self.parameters()]
        self.synced_generation = True

    def _restore_requires_grad(self) -> None:
        """Exactly the parameters that trained at construction train, whatever a pass did to the flags
        (any peft adapter call inside a role rewrites them)."""
        for param, flag in self._requires_grad:
            if param.requires_grad != flag:
                param.requires_grad_(flag)

    def keep_lora_input_dtype(self) -> None:
        """Stop peft casting LoRA inputs to the adapter weights' dtype (for passes under autocast)."""
        for layer in self._lora_layers:
            layer.cast_input_dtype_enabled = False

    # -- forward passes ---------------------------------------------------------------------------
    def response_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
    ) -> torch.Tensor:
        """Logits that predict the last `response_length` tokens: positions T-R-1 .. T-2 (B, R, V).

        Only those positions go through the output head (`logits_to_keep`), which saves the vocabulary
        projection of the prompt tokens.
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            logits_to_keep=response_length + 1,
            use_cache=False,
        )
        return out.logits[:, :-1]

    def generate(
        self, generation_config, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Prompts and sampled continuations (sampling.generate) under the active role. Sharded, every
        rank runs forward passes until the last rank's sequences are done (`synced_gpus`)."""
        extra = {"synced_gpus": True} if self.synced_generation else {}
        return sampling.generate(
            self.model, generation_config, input_ids=input_ids, attention_mask=attention_mask, **extra
        )

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The trunk's last hidden states (B, T, H), no output head."""
        return self.trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state

    def values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
    ) -> torch.Tensor:
        """V(s_t) for each response token t (B, R): the value head on the hidden state that predicts it."""
        with self.role(VALUE):
            hidden = self.hidden_states(input_ids, attention_mask)[:, -response_length - 1 : -1]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def reward_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The RM's score at the last non-pad token of each sequence (B,)."""
        with self.role(REWARD):
            hidden = self.hidden_states(input_ids, attention_mask)
        return head_scores(self.reward_head, hidden, attention_mask)

    @torch.no_grad()
    def put_value_head_on_scale(self, mean: float, std: float) -> None:
        """Rescale the critic copied from the RM head to the normalised score scale (normalize_head)."""
        fsdp.to_shards(self)  # sharded: change the shards, not a gathered copy
        weight, bias = normalize_head(self.value_head.weight, self.value_head.bias, mean, std)
        self.value_head.weight.copy_(weight)
        self.value_head.bias.copy_(bias)

    # -- what trains ------------------------------------------------------------------------------
    def policy_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if f".{POLICY}." in n and p.requires_grad]

    @property
    def has_critic(self) -> bool:
        return self.value_head is not None

    def value_parameters(self) -> list[torch.nn.Parameter]:
        """The value adapter's and head's parameters; none without a critic."""
        if self.value_head is None:
            return []
        adapter = [p for n, p in self.model.named_parameters() if f".{VALUE}." in n and p.requires_grad]
        return adapter + list(self.value_head.parameters())


def _load_lora_tensors(peft_model, tensors: dict[str, torch.Tensor], adapter: str, source: str) -> None:
    """Load saved LoRA tensors (peft's on-disk names) into adapter `adapter`, checking all were used."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, tensors, adapter_name=adapter)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise UserError(
            f"{source}: adapter weights do not fit the base model (e.g. {unexpected[0]}); "
            "was it trained on another base model?"
        )
    missing = [k for k in result.missing_keys if f".{adapter}." in k and "lora_" in k]
    if missing:
        raise UserError(
            f"{source}: adapter is missing weights for {missing[0]}; was it trained on another base model?"
        )


def _copy_adapter(peft_model, source: str, target: str) -> None:
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if f".{target}." in name:
                value = params[name.replace(f".{target}.", f".{source}.")]
                # On the meta device (train.strategy=fsdp, a rank other than 0) there is nothing to copy:
                # the rank receives rank 0's copy when it is sharded.
                if not (value.is_meta or param.is_meta):
                    param.copy_(value)


def build_roles(
    base_model,
    lora_cfg,
    sft_adapter: str | None,
    reward_adapter: str | None,
    hidden_size: int,
    critic: bool = True,
) -> Roles:
    """Put the roles on `base_model` (a frozen CausalLM).

    critic: add the value adapter and head (GAE); a critic-free estimator runs without them.

    sft_adapter: the SFT stage's final/ when it is a LoRA adapter (policy + reference start from it).
    reward_adapter: our RM's final/ when it shares this base (reward adapter + head; the value starts
    from it). Without it the value adapter starts from the policy's weights with a zero head.
    """
    from peft import get_peft_model

    for p in base_model.parameters():
        p.requires_grad_(False)
    # A 4-bit base: rollouts must not switch its layers to a kernel without a backward.
    keep_4bit_differentiable(base_model)
    device = next(base_model.parameters()).device

    if sft_adapter:
        sft_config, sft_tensors = read_adapter(sft_adapter)
        policy_config = lora_config_from(sft_config)
    else:
        sft_tensors = None
        policy_config = peft_lora_config(
            lora_cfg, "CAUSAL_LM", dropout=0.0, fan_in_fan_out=has_conv1d_layers(base_model)
        )
    model = get_peft_model(base_model, policy_config, adapter_name=POLICY)
    if sft_tensors is not None:
        _load_lora_tensors(model, sft_tensors, POLICY, f"sft_checkpoint={sft_adapter}")
        model.add_adapter(REFERENCE, lora_config_from(sft_config))
        _load_lora_tensors(model, sft_tensors, REFERENCE, f"sft_checkpoint={sft_adapter}")

    reward_head = None
    value_head = torch.nn.Linear(hidden_size, 1, bias=False, device=device, dtype=torch.float32)
    if reward_adapter:
        rm_config, rm_tensors = read_adapter(reward_adapter)
        head = head_name_of(rm_config, rm_tensors)
        lora_tensors, head_tensors = split_head(rm_tensors, head)
        if "weight" not in head_tensors:
            raise UserError(
                f"reward_checkpoint={reward_adapter}: no score head saved with the adapter "
                "(expected peft modules_to_save, e.g. 'score')."
            )
        for name in (REWARD, VALUE) if critic else (REWARD,):
            model.add_adapter(name, lora_config_from(rm_config))
            _load_lora_tensors(model, lora_tensors, name, f"reward_checkpoint={reward_adapter}")
        weight = head_tensors["weight"].to(device, torch.float32)
        has_bias = "bias" in head_tensors
        reward_head = torch.nn.Linear(hidden_size, 1, bias=has_bias, device=device, dtype=torch.float32)
        # The critic always has a bias, 0 where the RM head has none: putting it on the normalised
        # score scale moves the RM's mean there.
        value_head = torch.nn.Linear(hidden_size, 1, bias=True, device=device, dtype=torch.float32)
        with torch.no_grad():
            bias = head_tensors.get("bias", torch.zeros(1)).to(device, torch.float32).reshape(1)
            for head_module in (reward_head, value_head):
                head_module.weight.copy_(weight.reshape(1, -1))
                if head_module.bias is not None:
                    head_module.bias.copy_(bias)
        reward_head.requires_grad_(False)
    elif critic:
        model.add_adapter(VALUE, policy_config)
        _copy_adapter(model, POLICY, VALUE)
        torch.nn.init.zeros_(value_head.weight)
    if not critic:
        value_head = None

    # Exactly the policy and value adapters train; peft's add_adapter may have changed flags.
    for name, param in model.named_parameters():
        param.requires_grad_(f".{POLICY}." in name or f".{VALUE}." in name)
    if value_head is not None:
        value_head.requires_grad_(True)
    keep_trainable_in_fp32(model)  # peft upcasts LoRA weights by default; this does not depend on it
    disable_dropout(model)
    roles = Roles(model, value_head, reward_head, has_reference_adapter=sft_tensors is not None)
    return roles
