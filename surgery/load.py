"""Load a causal LM and its tokenizer from a local directory, a ``.gguf`` file or a hub id, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .families import family_for
from .pruned_modeling import PREFIX as PRUNED_PREFIX, pruned_classes
from .errors import UserError
from .gguf_source import gguf_config, gguf_model, gguf_tokenizer, is_gguf, read_header

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

class ModelLoadError(UserError):
    """A model path or hub id that cannot be loaded."""

def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]

def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

def looks_local(name: str) -> bool:
    """Paths (./x, /x, ~/x, x.gguf, or anything that exists) are local; 'org/name' is a hub id."""
    return name.startswith((".", "/", "~")) or is_gguf(name) or Path(name).expanduser().exists()

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # weight files torch would unpickle


def pickle_problem(name: str) -> str | None:
    """Why a local model folder is refused: its weights are pickles (unpickling can run code) and it has no
    safetensors weights. Weights are only ever read from safetensors files."""
    path = Path(name).expanduser()
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLED and p.name != "training_args.bin")
    if not pickled:
        return None
    return (f"model {name}: its weights are pickles ({', '.join(pickled[:3])}), which can run code when loaded; "
            "only safetensors weights are read: convert them (save_pretrained(..., safe_serialization=True))")


def check_model_source(name: str) -> None:
    """Fail early for a local directory that is missing, has no config.json or holds pickled weights, or a bad
    ``.gguf`` file."""
    if is_gguf(name):
        read_header(name)
    elif looks_local(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model path {name!r} has no config.json (missing or not a model directory)")
        problem = pickle_problem(name)
        if problem:
            raise ModelLoadError(problem)

def register_pruned(name: str) -> None:
    """Make a local partially-pruned export loadable without ``trust_remote_code`` (registers its classes)."""
    config_file = Path(name).expanduser() / "config.json"
    if not config_file.is_file():
        return
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "")
    if model_type.startswith(PRUNED_PREFIX):
        pruned_classes(model_type[len(PRUNED_PREFIX) :])

def _location(name: str) -> str:
    return str(Path(name).expanduser()) if looks_local(name) else name

def load_model_config(name: str, *, trust_remote_code: bool = False):
    """The model's config without its weights: config.json, a hub id, or a GGUF file's header."""
    if is_gguf(name):
        return gguf_config(name)
    from transformers import AutoConfig

    check_model_source(name)
    if looks_local(name):
        register_pruned(name)
    return AutoConfig.from_pretrained(_location(name), trust_remote_code=trust_remote_code)

def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    if is_gguf(name):
        return gguf_tokenizer(name)
    from transformers import AutoTokenizer

    check_model_source(name)
    return AutoTokenizer.from_pretrained(_location(name), trust_remote_code=trust_remote_code)

def load_model(name: str, *, dtype: str = "float32", device: str = "auto", trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) from a model directory, hub id or ``.gguf`` file; its family must be supported."""
    if is_gguf(name):
        model, tokenizer = gguf_model(name, resolve_dtype(dtype)), gguf_tokenizer(name)
        return model.to(resolve_device(device)).eval(), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(name)
    if looks_local(name):
        register_pruned(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(  # safetensors only: a pickle is never unpickled
            _location(name), dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(_location(name), trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelLoadError(f"cannot load model {name!r}: {error}") from None
    family_for(model.config)
    return model.to(resolve_device(device)).eval(), tokenizer
