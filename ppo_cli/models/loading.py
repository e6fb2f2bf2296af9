"""Loading base models and tokenizers from the Hub or a local directory.

The pad token is never EOS (a model trained with pad == EOS never learns to stop); `trust_remote_code` only
when the config asks for it.

A Hub name on a machine without network would cost about a minute of retries (huggingface_hub retries each
file) before the error. Before the first Hub load, one TCP connection to the Hub's host (a few seconds at
most) tells whether it can be reached; when it cannot, models and tokenizers load from the local Hugging
Face cache only (`local_files_only`), at once, and a name that is not there is an error that says so.
HF_HUB_OFFLINE=1 skips the check (the cache only, as huggingface_hub does), and so does a proxy setting
(the proxy, not this machine, reaches the Hub)."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from omegaconf import DictConfig

from ppo_cli.data import turn_end_id
from ppo_cli.errors import UserError
from ppo_cli.models.devices import resolve_dtype
from ppo_cli.models.quantization import bnb_config

PAD_TOKEN = "<|pad|>"
# Seconds the Hub reachability check waits for the name lookup and for the connection, each.
HUB_PROBE_TIMEOUT = 3.0
# huggingface_hub's words for true in HF_HUB_OFFLINE.
_TRUE = {"1", "ON", "YES", "TRUE"}
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
OFFLINE_HINT = "set HF_HUB_OFFLINE=1 to use the local Hugging Face cache without trying the network"


def looks_local(name_or_path: str) -> bool:
    """True for what can only be a local path (a Hub id is `name` or `owner/name`)."""
    return str(name_or_path).startswith(("/", ".", "~")) or str(name_or_path).count("/") > 1


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' older TRANSFORMERS_OFFLINE) is set: the cache only."""
    return any(os.environ.get(key, "").upper() in _TRUE for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_host() -> tuple[str, int]:
    """The Hub's (host, port): HF_ENDPOINT's, as huggingface_hub reads it, or huggingface.co."""
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.cache
def hub_unreachable() -> str | None:
    """Why this machine cannot reach the Hub (a name that does not resolve, a connection refused or
    timed out), or None when it can, when HF_HUB_OFFLINE is set, or behind a proxy. Asked once per
    process: the answer does not change within a run, and each ask may cost seconds."""
    if hub_offline() or any(os.environ.get(key) for key in _PROXY_VARS):
        return None
    host, port = hub_host()
    found: list[Any] = []
    # getaddrinfo has no timeout of its own: a hanging resolver must not hang the run.
    lookup = threading.Thread(target=lambda: found.append(_resolve(host, port)), daemon=True)
    lookup.start()
    lookup.join(HUB_PROBE_TIMEOUT)
    if not found:
        return f"looking up {host} took over {HUB_PROBE_TIMEOUT:g} s"
    if isinstance(found[0], OSError):
        return f"{host}: {found[0].strerror or found[0]}"
    try:
        with socket.create_connection(found[0], timeout=HUB_PROBE_TIMEOUT):
            return None
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def _resolve(host: str, port: int) -> tuple[str, int] | OSError:
    try:
        address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4]
        return address[0], address[1]
    except OSError as exc:
        return exc


def hub_kwargs(name_or_path: str) -> dict[str, Any]:
    """from_pretrained's extra arguments for `name_or_path`: the cache only for a Hub name when the Hub
    cannot be reached (see the module's docstring)."""
    if Path(str(name_or_path)).expanduser().is_dir() or hub_unreachable() is None:
        return {}
    return {"local_files_only": True}


def load_error(what: str, name_or_path: str, exc: BaseException) -> UserError:
    """`cannot load WHAT 'NAME': ...`; when a Hub name's files could not be had (an OSError), what to do
    about the network or the cache, with transformers' own words last."""
    name, said = str(name_or_path), first_line(exc)
    if not isinstance(exc, OSError) or Path(name).expanduser().is_dir():
        return UserError(f"cannot load {what} '{name}': {said}")
    fetch = f"download it where there is a network (`hf download {name}`) or pass a local directory"
    if hub_offline():
        return UserError(
            f"cannot load {what} '{name}': HF_HUB_OFFLINE is set, so only the local Hugging Face cache is "
            f"looked in, and it is not there: {fetch}, or unset HF_HUB_OFFLINE. (transformers: {said})"
        )
    why = hub_unreachable()
    if why is not None:
        return UserError(
            f"cannot load {what} '{name}': the Hub is not reachable from this machine ({why}), and the "
            f"local Hugging Face cache does not hold it: {fetch}. HF_HUB_OFFLINE=1 skips this network "
            f"check. (transformers: {said})"
        )
    return UserError(f"cannot load {what} '{name}': {said} (check the name and the network; {OFFLINE_HINT}.)")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """Load a tokenizer and make sure it has a pad token distinct from EOS.

    Order of preference: the tokenizer's own pad token (if not EOS); its UNK token (if not EOS); a new
    `<|pad|>` token. A new token fits without resizing when the embedding matrix has spare rows (Qwen,
    Pythia); otherwise `load_causal_lm` resizes the embeddings.
    """
    from transformers import AutoTokenizer

    local = Path(name_or_path).expanduser()
    if looks_local(name_or_path) and not local.is_dir():
        raise UserError(f"cannot load the tokenizer of '{name_or_path}': no such directory.")
    if local.is_dir() and not any(
        (local / name).is_file() for name in ("config.json", "tokenizer_config.json", "tokenizer.json")
    ):
        raise UserError(
            f"cannot load the tokenizer of '{name_or_path}': the directory holds no Hugging Face model or "
            "tokenizer (no config.json, tokenizer_config.json or tokenizer.json)."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision, **hub_kwargs(name_or_path)
        )
    except Exception as exc:
        raise load_error("the tokenizer of", name_or_path, exc) from exc
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer of '{name_or_path}' has no EOS token; set one in its tokenizer_config.json."
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        unk = tokenizer.unk_token_id
        if unk is not None and unk != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    return tokenizer


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def local_or_hub(name_or_path: str) -> str:
    """An absolute path for a local directory (so adapter configs stay valid from any working
    directory), the Hub id unchanged otherwise."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def _from_pretrained(
    cls, name_or_path: str, model_cfg: DictConfig, dtype: torch.dtype, quantization=None, **kwargs: Any
):
    """`quantization`: a BitsAndBytesConfig (`kwargs` then hold the device_map that places it)."""
    name_or_path = local_or_hub(name_or_path)
    extra = {}
    if model_cfg.attn_implementation:
        extra["attn_implementation"] = model_cfg.attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    kwargs.update(hub_kwargs(name_or_path))
    try:
        return cls.from_pretrained(
            name_or_path,
            dtype=dtype,
            trust_remote_code=model_cfg.trust_remote_code,
            revision=model_cfg.revision,
            **extra,
            **kwargs,
        )
    except (ValueError, ImportError) as exc:
        if extra and "attn" in str(exc).lower():  # the architecture lacks this kernel: fall back
            return cls.from_pretrained(
                name_or_path,
                dtype=dtype,
                trust_remote_code=model_cfg.trust_remote_code,
                revision=model_cfg.revision,
                **kwargs,
            )
        raise load_error("model", name_or_path, exc) from exc
    except OSError as exc:
        raise load_error("model", name_or_path, exc) from exc


def _skeleton(cls, name_or_path: str, model_cfg: DictConfig, dtype: torch.dtype, **config_kwargs: Any):
    """The model `_from_pretrained` would give, built on the meta device: its modules, parameter names,
    shapes and dtypes, no weights read or allocated (train.strategy=fsdp: the ranks other than 0 build
    this and receive their shards from rank 0; ppo_cli/fsdp.py)."""
    from transformers import AutoConfig, GenerationConfig

    name_or_path = local_or_hub(name_or_path)
    kwargs = {"trust_remote_code": model_cfg.trust_remote_code, "revision": model_cfg.revision}
    kwargs.update(hub_kwargs(name_or_path))
    try:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs, **config_kwargs)
    except (OSError, ValueError) as exc:
        raise load_error("model", name_or_path, exc) from exc
    extra = {"attn_implementation": model_cfg.attn_implementation} if model_cfg.attn_implementation else {}
    with torch.device("meta"):
        try:
            model = cls.from_config(
                config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, **extra
            )
        except (ValueError, ImportError) as exc:
            if not extra or "attn" not in str(exc).lower():
                raise load_error("model", name_or_path, exc) from exc
            model = cls.from_config(config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
    model.name_or_path = name_or_path
    # The EOS ids a rank stops on come from here (`eos_token_ids`): the same as rank 0's. None saved:
    # from_pretrained keeps the one derived from the config, as from_config did.
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(name_or_path, **kwargs)
    return model


def fit_embeddings(model, tokenizer) -> None:
    """Grow the embedding matrix when the tokenizer gained a token the model has no row for (on the meta
    device only the shape: the rows come from rank 0)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        meta = model.get_input_embeddings().weight.is_meta
        model.resize_token_embeddings(len(tokenizer), mean_resizing=not meta)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _placed(quantization, device: torch.device) -> dict[str, Any]:
    """from_pretrained's device_map for a quantized base: bitsandbytes quantizes each layer as it is put
    on the device (a quantized model cannot be moved afterwards, and 8-bit refuses `.to`)."""
    return {} if quantization is None else {"device_map": {"": str(device)}}


def load_causal_lm(
    model_cfg: DictConfig,
    tokenizer,
    device: torch.device,
    name_or_path: str | None = None,
    frozen_compute: torch.dtype | None = None,
    autocast: torch.dtype | None = None,
    load_to: torch.device | None = None,
):
    """A causal LM on `device`; `frozen_compute`: see `resolve_dtype` (a base that never trains);
    `autocast`: the dtype the stage's passes compute in (a 4-bit base's compute dtype under auto).
    `load_to`: where the weights go instead of `device` (dtypes are still `device`'s): the CPU, or the
    meta device for the structure alone (`_skeleton`); `fsdp.load_device` says which.

    A quantized base (model.load_in_4bit / load_in_8bit) keeps model.dtype for the layers that are not
    quantized: `frozen_compute` does not apply to it (its linear layers are 4 or 8 bits already)."""
    from transformers import AutoModelForCausalLM

    quantization = bnb_config(model_cfg, device, autocast or frozen_compute)
    dtype = resolve_dtype(model_cfg.dtype, device, None if quantization else frozen_compute)
    if load_to is not None and load_to.type == "meta":
        model = _skeleton(AutoModelForCausalLM, name_or_path or model_cfg.name_or_path, model_cfg, dtype)
        fit_embeddings(model, tokenizer)
        return model
    model = _from_pretrained(
        AutoModelForCausalLM,
        name_or_path or model_cfg.name_or_path,
        model_cfg,
        dtype,
        quantization,
        **_placed(quantization, device),
    )
    fit_embeddings(model, tokenizer)
    return model if quantization else model.to(load_to or device)


def load_sequence_classifier(
    model_cfg: DictConfig,
    tokenizer,
    device: torch.device,
    name_or_path: str | None = None,
    autocast: torch.dtype | None = None,
    load_to: torch.device | None = None,
):
    """A one-label sequence classifier on `device` (`autocast`, `load_to`: see `load_causal_lm`); its
    score head is never quantized (transformers keeps a model's output layer in full precision)."""
    from transformers import AutoModelForSequenceClassification

    quantization = bnb_config(model_cfg, device, autocast)
    dtype = resolve_dtype(model_cfg.dtype, device)
    if load_to is not None and load_to.type == "meta":
        name = name_or_path or model_cfg.name_or_path
        model = _skeleton(AutoModelForSequenceClassification, name, model_cfg, dtype, num_labels=1)
        fit_embeddings(model, tokenizer)
        return model
    model = _from_pretrained(
        AutoModelForSequenceClassification,
        name_or_path or model_cfg.name_or_path,
        model_cfg,
        dtype,
        quantization,
        num_labels=1,
        **_placed(quantization, device),
    )
    fit_embeddings(model, tokenizer)
    return model if quantization else model.to(load_to or device)


def eos_token_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS, the model's generation EOS ids, and the chat template's end-of-turn token: a
    chat policy ends its answer there (SFT teaches it, the RM scores at it) even when the model's
    generation config leaves it out (a base model given a chat template)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in [
        *(extra if isinstance(extra, list) else [extra]),
        turn_end_id(tokenizer),
    ]:
        if value is not None and value not in ids and value != tokenizer.pad_token_id:
            ids.append(int(value))
    return ids


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
