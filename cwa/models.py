"""Load a causal LM and its tokenizer: a hub id (with revision), a local HF directory, a
`.gguf` file (transformers' GGUF loader), or the embedded default model.

Models are always returned in `eval()` mode (no dropout) with every parameter frozen
(`requires_grad=False`); a metric turns gradients on for the parameters it scores.
Second-order metrics need double backward, which fused attention kernels lack, so
`second_order=True` loads eager attention.

The model fingerprint identifies the *stored* model: parameter names, shapes and stored
dtypes plus a fixed strided sample of parameter bytes (and the hub revision when known),
read from the checkpoint's safetensors files when there are any, so the dtype the model
is loaded in does not change it (that is recorded separately). It costs a few reads even
for an 8B model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cwa.errors import CwaError, UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
_SAMPLES_PER_TENSOR = 64


class LoadedModel:
    """A model handle: tokenizer, config and fingerprint at once, the weights on first use
    of `.model` (so a cache hit never loads an 8B model)."""

    def __init__(self, loader, tokenizer, config, name, fingerprint, dtype, device, revision, source):
        self._loader = loader
        self._model = None
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self._fingerprint = fingerprint
        self.dtype = dtype
        self.device = device
        self.revision = revision
        self.source = source

    @property
    def model(self):
        if self._model is None:
            self._model = self._loader()
        return self._model

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model, None, self.revision)
        return self._fingerprint

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def info(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "device": self.device,
            "revision": self.revision,
            "source": self.source,
            "model_type": getattr(self.config, "model_type", None),
        }
        if self.loaded:
            d["n_parameters"] = sum(p.numel() for p in self.model.parameters())
        return d


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise UsageError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return dtype, getattr(torch, dtype)


def embedded_dir() -> Path:
    from cwa import assets

    return Path(assets.MODEL_DIR)


def load_model(
    model: str | None = None,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    second_order: bool = False,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    lazy: bool = False,
) -> LoadedModel:
    """Load model + tokenizer; one clear `CwaError` when it cannot be loaded."""
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr carries cwa's own progress, not loader bars
    hf_logging.set_verbosity_error()
    dev = resolve_device(device)
    dtype_name, tdtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"dtype": tdtype, "trust_remote_code": trust_remote_code}
    if second_order:
        kwargs["attn_implementation"] = "eager"
    if device_map:
        kwargs["device_map"] = device_map

    if model is None or model in ("embedded", "cwa-embedded-gpt2"):
        from cwa import assets

        assets.verify_model()  # the committed files, checked against their SHA-256
        path, source, name = embedded_dir(), "embedded", assets.EMBEDDED_MODEL_NAME
        load_from, tok_kwargs = str(path), {}
    elif model.endswith(".gguf"):
        p = Path(model)
        if not p.is_file():
            raise CwaError(f"--model {model}: no such GGUF file")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise CwaError(f"--model {model}: GGUF needs the 'gguf' package (pip install 'cwa[gguf]')") from None
        path, source, name = p, "gguf", model
        load_from = str(p.parent)
        kwargs["gguf_file"] = p.name
        tok_kwargs = {"gguf_file": p.name}
    elif Path(model).exists():
        path, source, name = Path(model), "local", model
        if not path.is_dir():
            raise CwaError(f"--model {model}: expected a model directory (HF format) or a .gguf file")
        if not (path / "config.json").is_file():
            raise CwaError(
                f"--model {model}: not a model directory (no config.json); pass a directory "
                "saved with save_pretrained, a hub id or a .gguf file"
            )
        load_from, tok_kwargs = str(path), {}
    elif _looks_like_path(model):
        raise CwaError(f"--model {model}: cannot load it (no such directory)")
    else:
        path, source, name = None, "hub", model
        load_from, tok_kwargs = model, {}
        if revision:
            kwargs["revision"] = revision
            tok_kwargs["revision"] = revision

    try:
        if source == "gguf":
            tok = _gguf_tokenizer(path, trust_remote_code)
        else:
            tok = AutoTokenizer.from_pretrained(load_from, trust_remote_code=trust_remote_code, **tok_kwargs)
        cfg_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "gguf_file", "trust_remote_code")}
        config = AutoConfig.from_pretrained(load_from, **cfg_kwargs)
    except Exception as e:  # the loaders raise many types (OSError, ValueError, SafetensorError, ...)
        raise CwaError(_load_error(model, source, e)) from None

    def loader():
        try:
            m = AutoModelForCausalLM.from_pretrained(load_from, **kwargs)
        except Exception as e:  # SafetensorError, UnpicklingError (refused .bin pickles), ...
            raise CwaError(_load_error(model, source, e)) from None
        if not device_map:
            m.to(dev)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    if source == "gguf":
        fp = gguf_fingerprint(path)
    else:
        ckpt = _checkpoint_dir(source, path, load_from, revision)
        fp = checkpoint_fingerprint(ckpt, revision) if ckpt is not None else None
    handle = LoadedModel(loader, tok, config, name, fp, dtype_name, dev, revision, source)
    if not lazy:
        handle.model  # noqa: B018 - load now
    return handle


# A tokenizer.json beside a .gguf wins over the GGUF's own vocabulary in transformers'
# tokenizer loader, which then also drops the special tokens (no BOS/EOS): a GGUF converted
# into its HF model's folder would silently lose the BOS of every window.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _gguf_tokenizer(p: Path, trust_remote_code: bool):
    """The tokenizer a GGUF file describes, loaded with that file alone in view."""
    import tempfile

    from transformers import AutoTokenizer

    def load(folder: str):
        return AutoTokenizer.from_pretrained(folder, gguf_file=p.name, trust_remote_code=trust_remote_code)

    if not any((p.parent / f).exists() for f in _HF_TOKENIZER_FILES):
        return load(str(p.parent))
    with tempfile.TemporaryDirectory(prefix="cwa-gguf-") as d:
        try:
            (Path(d) / p.name).symlink_to(p.resolve())
        except OSError:  # no symlinks here (some Windows setups): the plain load
            return load(str(p.parent))
        return load(d)


def _looks_like_path(model: str) -> bool:
    """A --model value that can only be a filesystem path (hub ids are NAME or ORG/NAME)."""
    return model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or "\\" in model


def _load_error(model: str | None, source: str, e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "custom code" in msg or "trust_remote_code" in msg:
        return (
            f"--model {model}: its code would have to run to load it; pass --trust-remote-code "
            "only if you trust its source"
        )
    if "Weights only load failed" in msg:  # torch.load(weights_only=True) refused a pickle
        msg = "its .bin checkpoint holds pickled objects that are not plain tensors; cwa never unpickles them"
    if source == "hub":
        return (
            f"--model {model}: cannot load it ({msg[:200]}); it is not available offline — "
            "download it first (huggingface-cli download) or pass a local directory"
        )
    return f"--model {model or 'embedded'}: cannot load it ({msg[:200]})"


def _checkpoint_dir(source: str, path: Path | None, load_from: str, revision: str | None) -> Path | None:
    if source in ("embedded", "local"):
        return path
    if source == "hub":
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(load_from, revision=revision, local_files_only=True))
        except Exception:
            return None
    return None


def gguf_fingerprint(path: Path) -> str:
    """Fingerprint of a GGUF file: its size, its first MiB (header, metadata, tensor table)
    and a fixed strided sample of 8-byte reads over the rest."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"gguf|{size}\n".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        step = max(1, size // 4096)
        for off in range(1 << 20, size, step):
            f.seek(off)
            h.update(f.read(8))
    return h.hexdigest()


def checkpoint_fingerprint(checkpoint_dir: Path, revision: str | None = None) -> str | None:
    """Fingerprint from the checkpoint's safetensors files, None when it has none."""
    files = sorted(checkpoint_dir.glob("*.safetensors")) if checkpoint_dir.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    h.update(f"revision={revision}\n".encode())
    for f in files:
        _hash_safetensors_sample(f, h)
    return h.hexdigest()


def model_fingerprint(model, checkpoint_dir: Path | None = None, revision: str | None = None) -> str:
    """Fingerprint of the stored model (see module docstring); falls back to the loaded
    parameters (GGUF, .bin checkpoints)."""
    if checkpoint_dir is not None:
        fp = checkpoint_fingerprint(checkpoint_dir, revision)
        if fp is not None:
            return fp
    import torch

    h = hashlib.sha256()
    h.update(f"revision={revision}\n".encode())
    for name, p in model.state_dict().items():
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}\n".encode())
        flat = p.detach().reshape(-1)
        if flat.numel():
            idx = torch.linspace(0, flat.numel() - 1, min(_SAMPLES_PER_TENSOR, flat.numel())).long()
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _hash_safetensors_sample(path: Path, h) -> None:
    try:
        _hash_header_and_sample(path, h)
    except (ValueError, KeyError, TypeError):  # JSONDecodeError, UnicodeDecodeError included
        raise CwaError(
            f"--model: {path} is not a valid safetensors file; the checkpoint is corrupt or "
            "incomplete (download or save it again)"
        ) from None


def _hash_header_and_sample(path: Path, h) -> None:
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= file_size - 8:  # never read a length taken from a corrupt file
            raise ValueError("bad header length")
        header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("bad header")
        base = 8 + n
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            h.update(f"{name}|{tuple(info['shape'])}|{info['dtype']}\n".encode())
            a, b = (int(x) for x in info["data_offsets"])
            size = b - a
            if size <= 0:
                continue
            step = max(1, size // _SAMPLES_PER_TENSOR)
            for off in range(0, size, step)[:_SAMPLES_PER_TENSOR]:
                f.seek(base + a + off)
                h.update(f.read(min(8, size - off)))
