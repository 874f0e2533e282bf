"""Load a causal LM and its tokenizer: a hub id (with revision), a local HF directory, a
`.gguf` file (transformers' GGUF loader), or the embedded default model.

Models are always returned in `eval()` mode (no dropout) with every parameter frozen
(`requires_grad=False`); a metric turns gradients on for the parameters it scores.
Second-order metrics need double backward, which fused attention kernels lack, so
`second_order=True` loads eager attention.

Loading is strict. A checkpoint that lacks a weight the architecture needs, holds one it
does not use, or stores one in another shape is an error naming the tensors, never a model
with randomly initialised parts (transformers' default is a logged warning). Pickle
checkpoints (`pytorch_model.bin`, ...) are refused unless `allow_pickle=True`, and are then
read with `torch.load(weights_only=True)`, which rebuilds tensors and plain containers only;
when safetensors files are present a pickle is never opened.

A hub id is resolved in the local Hugging Face cache first: its revision (branch, tag or
commit, default "main") names one commit through `refs/<name>`, and the model is loaded
from that commit's snapshot, so the tokenizer, config and weights come from one commit and a
tag and its commit are the same model. A snapshot that holds a config, a tokenizer and every
weight file is loaded from its folder, as a local directory, with or without
`HF_HUB_OFFLINE`: no request is made (given the hub id, transformers asks the hub about every
optional file, and without a network retries each one for minutes; even `local_files_only`
lets huggingface_hub make one request of its own). Anything else needs the hub: one HEAD request
without retries (`HF_HUB_ETAG_TIMEOUT`, 10 s) checks that it answers, and when it does not the
load fails at once with one line; when it does, transformers downloads what is missing.

`dtype="auto"` means what it means in transformers: the checkpoint's own dtype (`dtype` /
`torch_dtype` in config.json, else the dtype of its safetensors weights, else float32; a
.gguf de-quantizes to float32). One exception: a float16 checkpoint on the CPU loads in
float32, an exact upcast (CPU float16 arithmetic is emulated on most CPUs and its narrow range
underflows small gradients, which training avoided by loss scaling; bfloat16 has float32's
range and stays bfloat16, slow on CPUs without bfloat16 instructions but correct).

A PEFT adapter directory (`adapter_config.json`, needs the `peft` package) is loaded on top of
its base model (`base_model_name_or_path`: a local directory or a hub id, resolved as above)
and merged into it (`merge_and_unload`): the model that is scored and perturbed is the base
with the adapter's update added to its weights, under the base's parameter names; the
adapter's own factors (LoRA's A and B) are not parameters of it. Adapter keys that do not fit
the base, or base layers the adapter names but lacks, are an error, as for a checkpoint.
Its fingerprint hashes the base model's fingerprint with the adapter's weight file and
adapter_config.json.

The model fingerprint identifies the *stored* model, so that an edited checkpoint is never
a cache hit: the commit of a hub model; for each weight file transformers loads (the
safetensors files, else the pickle files, or the .gguf file) its name and the SHA-256 of
its full content, and the tensor names, shapes and stored dtypes of a safetensors header;
and the SHA-256 of config.json (an edited config runs the same weights differently). The
dtype the model is loaded in is not part of it; it is recorded separately. (The first
version hashed a strided sample of 512 bytes per tensor and missed edits of the others.)

Cost: a file is read once at the speed of SHA-256 (0.5-0.8 GB/s on one shared core of the
development machine: 20-30 s for 16 GB), then its hash is memoized in a small user cache
keyed by (real path, size, mtime_ns, inode), so an unchanged checkpoint is hashed once, not
per run. A hub snapshot costs no read at all: the cache stores each large (LFS) file as
`blobs/<sha256 of its content>`, so the blob's name is the hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cwa.errors import CwaError, UsageError
from cwa.memo import cache_dir, old_enough, read_memo, write_memo
from cwa.memo import stamp as file_stamp

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
FINGERPRINT_VERSION = "cwa-model/2"

_EMBEDDED_NAMES = ("embedded", "cwa-embedded-gpt2")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_READ_SIZE = 64 << 20  # bytes hashed per update (SHA-256, not the calls, sets the pace)
_MAX_HEADER = 100 << 20  # safetensors' own limit on a header's size


class LoadedModel:
    """A model handle: tokenizer, config and fingerprint at once, the weights on first use
    of `.model` (so a cache hit never loads an 8B model).

    `revision` is what the user asked for, `commit` the hub commit it resolved to (None
    for a local directory, a .gguf file or the embedded model)."""

    def __init__(self, loader, tokenizer, config, name, fingerprint, dtype, device, revision, source,
                 commit=None, checkpoint=None, late_fingerprint=None):
        self._loader = loader
        self._late_fingerprint = late_fingerprint  # (model) -> fingerprint, once the weights are there
        self._model = None
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self._fingerprint = fingerprint
        self.dtype = dtype
        self.device = device
        self.revision = revision
        self.commit = commit
        self.source = source
        self._checkpoint = checkpoint
        self._noted_dtype = False

    @property
    def model(self):
        if self._model is None:
            self._model = self._loader()
        return self._model

    def note_slow_dtype(self) -> None:
        """Say once, as long work on this model starts (not at load, where a refusal may
        still come), that bfloat16 is slow on a CPU without bfloat16 instructions."""
        if self._noted_dtype or self.device != "cpu" or self.dtype != "bfloat16":
            return
        self._noted_dtype = True
        if cpu_has_bf16() is False:
            from cwa.console import log

            log("note: bfloat16 on a CPU without bfloat16 instructions: its matrix products run 20-200x "
                "slower than float32's (measured on such a CPU); --dtype float32 is faster at twice the memory")

    @property
    def fingerprint(self) -> str:
        """Known at load time, except for a hub model whose weights were not downloaded yet:
        loading downloads them into the snapshot, then the files are hashed as usual."""
        if self._fingerprint is None:
            m = self.model
            if self._late_fingerprint is not None:
                self._fingerprint = self._late_fingerprint(m)
            else:
                self._fingerprint = _weights_fingerprint(m, self._checkpoint, self.commit)
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
            "commit": self.commit,
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


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return dtype


def resolve_dtype(dtype: str, device: str, stored: str | None = None):
    """(name, torch dtype) a model is loaded in. `auto` is transformers' meaning, the
    checkpoint's own dtype (`stored`; float32 when unknown), except that float16 becomes
    float32 on the CPU (see the module docstring)."""
    import torch

    check_dtype(dtype)
    if dtype == "auto":
        dtype = stored if stored in DTYPES[1:] else "float32"
        if dtype == "float16" and device == "cpu":
            dtype = "float32"
    return dtype, getattr(torch, dtype)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has bfloat16 instructions (x86's avx512_bf16 or amx_bf16, Arm's
    bf16), from /proc/cpuinfo's flags; None when that cannot be read (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    flags = {w for line in cpuinfo.splitlines() if line.lower().startswith(("flags", "features"))
             for w in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) if flags else None


_HEADER_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def stored_dtype(config: Any, folder: Path | None) -> str | None:
    """The checkpoint's own dtype: config's `dtype` (`torch_dtype` before transformers 5),
    else the most common floating dtype of its safetensors weights; None when unknown.
    `config` is a transformers config or the dict of a config.json."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    for key in ("dtype", "torch_dtype"):
        v = get(key)
        if v is not None and str(v).removeprefix("torch.") in _HEADER_DTYPES.values():
            return str(v).removeprefix("torch.")
    kind, files = weight_files(folder) if folder is not None else (None, [])
    if kind != "safetensors" or not all(f.is_file() for f in files):
        return None
    counts: dict[str, int] = {}
    for f in files:
        for _, (_, dt) in _safetensors_header(f).items():
            if dt in _HEADER_DTYPES:
                counts[_HEADER_DTYPES[dt]] = counts.get(_HEADER_DTYPES[dt], 0) + 1
    return max(counts, key=counts.get) if counts else None


def planned_dtype(model: str | None, revision: str | None, dtype: str, device: str) -> str | None:
    """The dtype name `load_model` will use, found without loading anything (the config.json
    of a local, embedded, adapter's base or cached hub model); None when `auto` cannot be
    resolved before the model is downloaded."""
    check_dtype(dtype)
    dev = resolve_device(device)
    if dtype != "auto":
        return dtype
    if model is not None and model.endswith(".gguf"):
        return "float32"
    folder = _config_folder(model, revision)
    if folder is None:
        return None
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        stored = stored_dtype(cfg if isinstance(cfg, dict) else {}, folder)
    except (OSError, ValueError, CwaError):
        return None
    return resolve_dtype("auto", dev, stored)[0]


def _config_folder(model: str | None, revision: str | None, depth: int = 0) -> Path | None:
    if model is None or model in _EMBEDDED_NAMES:
        return embedded_dir()
    p = Path(model)
    if p.is_dir():
        if (p / "config.json").is_file():
            return p
        base = _adapter_base(p).get("base_model_name_or_path") if (p / ADAPTER_CONFIG).is_file() else None
        return _config_folder(base, None, depth + 1) if isinstance(base, str) and depth == 0 else None
    found = hub_snapshot(model, revision) if not _looks_like_path(model) and not p.exists() else None
    return found[1] if found and (found[1] / "config.json").is_file() else None


def embedded_dir() -> Path:
    from cwa import assets

    return Path(assets.MODEL_DIR)


@dataclass
class _Source:
    """Where a --model value points: what transformers is given and where the files are."""

    kind: str  # embedded | local | gguf | hub
    name: str  # the model's name in artifacts (what the user passed)
    load_from: str  # the first argument of from_pretrained
    folder: Path | None  # the checkpoint folder (hub: the snapshot); None while not downloaded
    gguf: Path | None = None
    revision: str | None = None  # given to transformers (hub: the commit once resolved)
    commit: str | None = None
    local_only: bool = False  # hub, offline: only the cache may be read (local_files_only)
    adapter: Path | None = None  # a PEFT adapter directory merged into this (base) model
    adapter_arg: str | None = None  # the --model value that named the adapter


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
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load model + tokenizer; one clear `CwaError` when it cannot be loaded, a `UsageError`
    when the request is wrong (an unknown revision, a pickle checkpoint without
    `allow_pickle`, an unknown --device-map)."""
    _library_output()
    dev = resolve_device(device)
    check_dtype(dtype)
    device_map = resolve_device_map(device_map)
    src = _locate(model, revision)
    tok, config = _tokenizer_and_config(src, model, trust_remote_code)
    if src.kind == "hub" and src.folder is None:  # downloaded just now (online): resolve again
        found = hub_snapshot(src.name, src.revision)
        if found:
            src.commit, src.folder = found
            src.revision = src.commit
    stored = "float32" if src.gguf is not None else stored_dtype(config, src.folder)
    dtype_name, tdtype = resolve_dtype(dtype, dev, stored)

    kwargs: dict[str, Any] = {"dtype": tdtype, "trust_remote_code": trust_remote_code}
    kwargs.update(_weight_kwargs(src, allow_pickle))
    if src.revision:
        kwargs["revision"] = src.revision
    if src.local_only:
        # adapter_kwargs: transformers looks for an adapter_config.json with its own hub
        # options, which do not inherit local_files_only (a request, retried, per load)
        kwargs.update(local_files_only=True, adapter_kwargs={"local_files_only": True})
    if second_order:
        kwargs["attn_implementation"] = "eager"
    if device_map:
        kwargs["device_map"] = device_map
    loader = _loader(src, model, kwargs, dev, device_map)
    fingerprint, late = _source_fingerprint(src), None
    if src.adapter is not None:
        adapter_file = _adapter_weights(src, allow_pickle)
        loader = _adapter_loader(loader, src, dev, device_map)
        fingerprint = None if fingerprint is None else adapter_fingerprint(src.adapter, fingerprint, adapter_file)
        late = lambda m: adapter_fingerprint(  # noqa: E731 - the base was downloaded on load
            src.adapter, _weights_fingerprint(m, src.folder, src.commit, adapter=True), adapter_file)
    handle = LoadedModel(loader, tok, config, src.adapter_arg or src.name, fingerprint, dtype_name, dev,
                         revision, "peft" if src.adapter is not None else src.kind, commit=src.commit,
                         checkpoint=src.folder, late_fingerprint=late)
    if not lazy:
        handle.model  # noqa: B018 - load now
    return handle


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(device_map: str | None) -> str | None:
    """A --device-map strategy of accelerate's, checked before anything is read; accelerate
    must be installed for it."""
    if device_map is None:
        return None
    if device_map not in DEVICE_MAPS:
        raise UsageError(
            f"--device-map {device_map!r}: choose one of {', '.join(DEVICE_MAPS)} "
            "(for one device use --device)"
        )
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise CwaError(
            f"--device-map {device_map}: needs the 'accelerate' package "
            "(pip install accelerate, or pip install 'cwa[distributed]')"
        ) from None
    return device_map


def _weights_fingerprint(m, folder: Path | None, commit: str | None, adapter: bool = False) -> str:
    """Fingerprint of the files in `folder`, else of the loaded weights (`model_fingerprint`;
    for a merged adapter that would hash the merge, so the base's files are required)."""
    fp = checkpoint_fingerprint(folder, commit) if folder is not None else None
    if fp is None and adapter:
        raise CwaError("--model: the PEFT adapter's base model has no weight files to fingerprint")
    return fp or model_fingerprint(m, commit=commit)


def _library_output() -> None:
    """transformers', datasets' and the hub's own progress bars and log lines stay off
    stderr (it carries cwa's progress) unless --verbose."""
    from transformers.utils import logging as hf_logging

    if library_progress():
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def library_progress() -> bool:
    """Whether the libraries' progress bars may show: with --verbose, not with --quiet."""
    from cwa import console

    return bool(getattr(console, "_verbose", False)) and not console.is_quiet()


def _loader(
    src: _Source, model: str | None, kwargs: dict[str, Any], dev: str, device_map: str | None
) -> Callable[[], Any]:
    """The function that loads the weights (now, or on first use of a lazy handle): on
    `dev` unless a device map places them, in eval mode, without gradients."""

    def loader():
        from transformers import AutoModelForCausalLM

        try:
            # ignore_mismatched_sizes: transformers would raise a RuntimeError that points at
            # a log report cwa silences; the shapes are checked (and named) just below.
            with _gguf_bar_off(src):
                m, info = AutoModelForCausalLM.from_pretrained(
                    src.load_from, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
                )
        except Exception as e:  # SafetensorError, UnpicklingError (refused .bin pickles), ...
            raise CwaError(_load_error(model if src.adapter is None else src.name, src.kind, e)) from None
        _check_complete(src.name, info)
        if not device_map:
            m.to(dev)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    return loader


@contextlib.contextmanager
def _gguf_bar_off(src: _Source):
    """transformers de-quantizes a GGUF under a tqdm bar of its own (`tqdm.auto`, which its
    `disable_progress_bar` does not reach): switched off for the load unless --verbose."""
    if src.gguf is None or library_progress():
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


# --------------------------------------------------------------------------- PEFT adapters

ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _adapter_base(adapter_dir: Path) -> dict:
    """adapter_config.json as a dict ({} when it cannot be read)."""
    try:
        d = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def adapter_base_ref(path: Path, label: str) -> tuple[str, str | None]:
    """(base model, its hub revision or None) that PEFT adapter directory `path` names in
    its adapter_config.json; `label` starts the errors (`--model DIR`, or DIR for cwa info)."""
    acfg = _adapter_base(path)
    base = acfg.get("base_model_name_or_path")
    if not acfg:
        raise CwaError(f"{label}: {ADAPTER_CONFIG} is not a readable JSON object")
    if not isinstance(base, str) or not base.strip():
        raise CwaError(
            f"{label}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path); "
            "set it to the base model's hub id or directory"
        )
    is_path = Path(base).exists() or _looks_like_path(base) or base in _EMBEDDED_NAMES
    rev = acfg.get("revision") if not is_path and isinstance(acfg.get("revision"), str) else None
    return base, rev or None


def adapter_weights_file(adapter_dir: Path) -> Path | None:
    """The adapter's weight file (safetensors before pickle), None when there is none."""
    return next((f for f in (adapter_dir / n for n in _ADAPTER_WEIGHTS) if f.is_file()), None)


def _locate_adapter(path: Path, model: str) -> _Source:
    """The base model of PEFT adapter directory `path`, located like any --model value, with
    the adapter attached."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise CwaError(
            f"--model {model}: is a PEFT adapter ({ADAPTER_CONFIG}); loading it needs the 'peft' "
            "package (pip install 'cwa[peft]')"
        ) from None
    base, rev = adapter_base_ref(path, f"--model {model}")
    try:
        src = _locate(base, rev)
    except CwaError as e:
        raise type(e)(f"--model {model}: its base model {base} ({ADAPTER_CONFIG}) cannot be used: {e}") from None
    if src.adapter is not None:
        raise CwaError(f"--model {model}: its base model {base} is itself an adapter; merge that one first")
    src.adapter, src.adapter_arg = path, model
    return src


def _adapter_weights(src: _Source, allow_pickle: bool) -> Path:
    """The adapter's weight file: safetensors, or a pickle only with `allow_pickle` (which
    peft then reads with `torch.load(weights_only=True)`)."""
    f = adapter_weights_file(src.adapter)
    if f is None:
        raise CwaError(f"--model {src.adapter_arg}: the adapter has no weights ({' or '.join(_ADAPTER_WEIGHTS)})")
    if f.suffix != ".safetensors" and not allow_pickle:
        raise UsageError(
            f"--model {src.adapter_arg}: the adapter holds only a pickle ({f.name}); cwa never "
            "unpickles files: save it with safetensors (save_pretrained(dir)) or pass --allow-pickle"
        )
    return f


def _adapter_loader(base_loader: Callable[[], Any], src: _Source, dev: str, device_map: str | None):
    """Load the base, apply the adapter with peft, check that every key fitted, merge."""

    def loader():
        import warnings

        from peft import PeftConfig, PeftModel

        base = base_loader()
        name = src.adapter_arg
        try:
            with warnings.catch_warnings():
                if not library_progress():
                    warnings.simplefilter("ignore")  # peft's notes (fan_in_fan_out, ...) stay off stderr
                pcfg = PeftConfig.from_pretrained(str(src.adapter))
                pm = PeftModel(base, pcfg)
                res = pm.load_adapter(str(src.adapter), "default", is_trainable=False)
        except Exception as e:  # ValueError (an unknown target module), KeyError, SafetensorError, ...
            raise CwaError(f"--model {name}: cannot apply the PEFT adapter ({_first_line(e)[:200]})") from None
        unexpected = sorted(getattr(res, "unexpected_keys", None) or ())
        missing = sorted(getattr(res, "missing_keys", None) or ())
        if unexpected or missing:
            what = [f"{len(unexpected)} adapter weight(s) fit no layer of the base: {_few(unexpected)}"] if unexpected else []
            what += [f"{len(missing)} adapter weight(s) are missing: {_few(missing)}"] if missing else []
            raise CwaError(f"--model {name}: " + "; ".join(what) + "; the adapter does not belong to this base model")
        try:
            m = pm.merge_and_unload()
        except Exception as e:  # prompt-learning adapters have no weights to merge
            raise CwaError(
                f"--model {name}: its adapter ({pcfg.peft_type}) cannot be merged into the weights "
                f"({_first_line(e)[:200]}); cwa scores weights, so it needs a weight adapter such as LoRA"
            ) from None
        if not device_map:
            m.to(dev)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    return loader


def adapter_fingerprint(adapter_dir: Path, base_fingerprint: str, weights: Path) -> str:
    """Fingerprint of base + adapter: the base model's fingerprint, the adapter's weight file
    (its safetensors header and the SHA-256 of its content) and adapter_config.json."""
    h = hashlib.sha256(f"{FINGERPRINT_VERSION}|peft|base={base_fingerprint}\n".encode())
    if weights.suffix == ".safetensors":
        for name, (shape, dtype) in sorted(_safetensors_header(weights).items()):
            h.update(f"{name}|{shape}|{dtype}\n".encode())
    h.update(f"file={weights.name}|sha256={_file_hash(weights)}\n".encode())
    h.update(f"{ADAPTER_CONFIG}|sha256={_file_hash(adapter_dir / ADAPTER_CONFIG)}\n".encode())
    return h.hexdigest()


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _source_fingerprint(src: _Source) -> str | None:
    """The checkpoint's fingerprint: of the `.gguf` file, or of the folder's weights."""
    if src.gguf is not None:
        return gguf_fingerprint(src.gguf)
    return checkpoint_fingerprint(src.folder, src.commit) if src.folder is not None else None


def _locate(model: str | None, revision: str | None) -> _Source:
    """Classify the --model value and check it exists; hub ids are resolved in the cache."""
    if model is None or model in _EMBEDDED_NAMES:
        from cwa import assets

        _no_revision(revision, model or "embedded", "the embedded model")
        assets.verify_model()  # the committed files, checked against their SHA-256
        d = embedded_dir()
        return _Source("embedded", assets.EMBEDDED_MODEL_NAME, str(d), d)
    if model.endswith(".gguf"):
        p = Path(model)
        _no_revision(revision, model, "a .gguf file")
        if not p.is_file():
            raise CwaError(f"--model {model}: no such GGUF file")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise CwaError(f"--model {model}: GGUF needs the 'gguf' package (pip install 'cwa[gguf]')") from None
        return _Source("gguf", model, str(p.parent), None, gguf=p)
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise CwaError(f"--model {model}: expected a model directory (HF format) or a .gguf file")
        _no_revision(revision, model, "a local directory")
        if not (path / "config.json").is_file():
            if (path / ADAPTER_CONFIG).is_file():
                return _locate_adapter(path, model)
            raise CwaError(
                f"--model {model}: not a model directory (no config.json); pass a directory "
                "saved with save_pretrained, a PEFT adapter directory, a hub id or a .gguf file"
            )
        return _Source("local", model, str(path), path)
    if _looks_like_path(model):
        raise CwaError(f"--model {model}: cannot load it (no such directory)")
    return _locate_hub(model, revision)


def _no_revision(revision: str | None, model: str, what: str) -> None:
    if revision is not None:
        raise UsageError(
            f"--revision {revision}: --revision applies to hub ids only, and --model {model} is "
            f"{what}; drop --revision"
        )


def _locate_hub(model: str, revision: str | None) -> _Source:
    """The cached snapshot of `revision`, read without a request when it holds everything
    (`local_files_only`); else the hub, after one quick check that it answers. Offline, a
    revision that is not cached is an error (a UsageError when the repository is cached and
    the name is simply not one of its refs)."""
    from huggingface_hub import constants

    found = hub_snapshot(model, revision)
    offline = bool(constants.HF_HUB_OFFLINE)
    if found:
        commit, snap = found
        if not (snap / "config.json").is_file() and (snap / ADAPTER_CONFIG).is_file():
            return _locate_adapter(snap, model)  # a cached PEFT adapter repository
        missing = snapshot_missing(snap)
        if not missing:  # read as a local directory: no hub call at all, not even to build headers
            return _Source("hub", model, str(snap), snap, commit=commit)
        lacks = f"its cached snapshot {commit[:12]} lacks {_few(missing)}"
        if not offline:
            _check_hub(model, commit, lacks)
        elif missing != ["a tokenizer file"]:  # (a tokenizer of a kind not listed may be there)
            raise CwaError(
                f"--model {model}: it is not available offline: {lacks} — download it first "
                f"(hf download {model}) or pass a local directory"
            )
        return _Source("hub", model, model, snap, revision=commit, commit=commit, local_only=offline)
    if not offline:
        _check_hub(model, revision, "it is not in the local cache")
        return _Source("hub", model, model, None, revision=revision)  # transformers downloads it
    refs = hub_refs(model)
    if revision is not None and refs is not None:
        raise UsageError(
            f"--revision {revision}: no branch, tag or commit of that name is in the local cache of "
            f"{model} (cached: {', '.join(refs) or 'none'}); download it first "
            f"(hf download {model} --revision {revision}) or pick a cached one"
        )
    at = f" at revision {revision}" if revision else ""
    raise CwaError(
        f"--model {model}: it is not available offline{at} — download it first "
        f"(hf download {model}) or pass a local directory"
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def snapshot_missing(folder: Path) -> list[str]:
    """What a hub snapshot lacks of what loading reads: config.json, a tokenizer file, the
    weight files (every shard an index names); [] when it is complete."""
    out = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        out.append("a tokenizer file")
    try:
        _, files = weight_files(folder)
    except CwaError:  # a corrupt index: the load says so
        return out
    if not files:
        out.append("its weights (model.safetensors)")
    out += [f.name for f in files if not f.is_file()]
    return out


def snapshot_complete(folder: Path) -> bool:
    return not snapshot_missing(folder)


def hub_check(repo_id: str, filename: str, *, repo_type: str | None = None,
              revision: str | None = None) -> tuple[str, str] | None:
    """One HEAD request for `filename` of a hub repository, without retries (huggingface_hub's
    retries of an unreachable hub take minutes): None when the hub answers with the file (or
    without it: the loader then says what is missing), else (kind, detail) with kind one of
    unreachable, missing, gated, revision, http."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision)
        get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError:
        return "gated", "it is gated: accept its terms on the hub and log in (hf auth login)"
    except RevisionNotFoundError:
        return "revision", "the hub has no branch, tag or commit of that name"
    except RepositoryNotFoundError:
        return "missing", "the hub has no such repository (or it is private: log in with hf auth login)"
    except EntryNotFoundError:
        return None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        return "http", f"the hub answered HTTP {status}" if status else f"the hub failed ({_first_line(e)[:120]})"
    except Exception as e:  # httpx.ConnectError / TimeoutException, OSError, ValueError (a bad id), ...
        if type(e).__name__ in ("HFValidationError",):
            return "missing", f"not a valid hub id ({_first_line(e)[:120]})"
        return "unreachable", f"{type(e).__name__}: {_first_line(e)[:120]}"
    return None


def _check_hub(model: str, revision: str | None, why: str) -> None:
    """Fail at once, with one line, when the hub cannot give what is not cached."""
    from huggingface_hub import constants

    got = hub_check(model, "config.json", revision=revision)
    if got is None:
        return
    kind, detail = got
    if kind == "revision":
        raise UsageError(f"--revision {revision}: {model} has no branch, tag or commit of that name")
    if kind == "unreachable":
        raise CwaError(
            f"--model {model}: {why} and the hub ({constants.ENDPOINT}) cannot be reached ({detail}); "
            f"download it where there is a network (hf download {model}), point HF_HOME at a cache "
            "that holds it, or pass a local directory"
        )
    raise CwaError(f"--model {model}: {why} and {detail}")


def _hub_repo_dir(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def hub_snapshot(repo_id: str, revision: str | None = None) -> tuple[str, Path] | None:
    """(commit, snapshot folder) of `revision` (branch, tag or commit; default "main") of
    hub model `repo_id` in the local cache, None when it is not there.

    Read from the cache's documented layout (`refs/<name>` holds a commit,
    `snapshots/<commit>/` its files) rather than with `snapshot_download(local_files_only=
    True)`, which refuses a snapshot that lacks files cwa does not need (e.g. the TF and
    Flax weights of a repository downloaded with a filter)."""
    repo = _hub_repo_dir(repo_id)
    rev = revision or "main"
    if _COMMIT.fullmatch(rev):
        commit = rev
    else:
        try:
            commit = (repo / "refs" / rev).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
    snap = repo / "snapshots" / commit
    return (commit, snap) if _COMMIT.fullmatch(commit) and snap.is_dir() else None


def hub_refs(repo_id: str) -> list[str] | None:
    """The branch and tag names cached for `repo_id`, None when the repository is not cached."""
    repo = _hub_repo_dir(repo_id)
    if not repo.is_dir():
        return None
    refs = repo / "refs"
    if not refs.is_dir():
        return []
    return sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file())


def _tokenizer_and_config(src: _Source, model: str | None, trust_remote_code: bool):
    from transformers import AutoConfig, AutoTokenizer

    try:
        if src.gguf is not None:
            tok = _gguf_tokenizer(src.gguf, trust_remote_code)
            config = AutoConfig.from_pretrained(src.load_from, gguf_file=src.gguf.name,
                                                trust_remote_code=trust_remote_code)
        else:
            kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
            if src.revision:
                kw["revision"] = src.revision
            if src.local_only:
                kw["local_files_only"] = True
            config = AutoConfig.from_pretrained(src.load_from, **kw)
            if src.adapter is not None and any((src.adapter / f).is_file() for f in _TOKENIZER_FILES):
                # an adapter saved with its tokenizer (e.g. tokens added in fine-tuning) uses that one
                tok = AutoTokenizer.from_pretrained(str(src.adapter), trust_remote_code=trust_remote_code)
            else:
                tok = AutoTokenizer.from_pretrained(src.load_from, **kw)
    except Exception as e:  # the loaders raise many types (OSError, ValueError, SafetensorError, ...)
        if type(e).__name__ == "RevisionNotFoundError":  # online, and the hub has no such revision
            raise UsageError(
                f"--revision {src.revision}: {src.name} has no branch, tag or commit of that name"
            ) from None
        raise CwaError(_load_error(model if src.adapter is None else src.name, src.kind, e)) from None
    return tok, config


def _weight_kwargs(src: _Source, allow_pickle: bool) -> dict[str, Any]:
    """from_pretrained options that decide which weight files are read: safetensors when there
    are any; a pickle only with `allow_pickle`, and only with `weights_only=True`."""
    if src.gguf is not None:
        return {"gguf_file": src.gguf.name}
    kind, files = weight_files(src.folder) if src.folder is not None else (None, [])
    if kind == "pickle" and not allow_pickle:
        raise UsageError(
            f"--model {src.name}: holds only a pickle checkpoint ({_few([f.name for f in files])}); "
            "cwa never unpickles files: convert it to safetensors "
            "(model.save_pretrained(dir, safe_serialization=True)) or pass --allow-pickle"
        )
    if kind == "pickle":
        use_safetensors = False
    elif kind == "safetensors" or not allow_pickle:  # not downloaded yet: safetensors or nothing
        use_safetensors = True
    else:
        use_safetensors = None
    return {"use_safetensors": use_safetensors, "weights_only": True}


def _check_complete(name: str, info: dict) -> None:
    """Refuse a model that transformers completed with random weights or loaded partly.

    transformers already leaves out what is legitimately absent or extra: tied weights
    (GPT-2's lm_head is wte), non-persistent buffers, and its per-architecture ignore lists
    (GPT-2's stored `attn.bias` masks, old `rotary_emb.inv_freq` buffers)."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)
    errors = [str(e) for e in info.get("error_msgs") or ()]
    problems = []
    if missing:
        problems.append(
            f"checkpoint is missing {len(missing)} weight(s) the architecture needs: {_few(missing)}"
        )
    if mismatched:
        shapes = [_mismatch(m) for m in mismatched]
        problems.append(
            f"{len(mismatched)} weight(s) have another shape than the architecture needs: {_few(shapes)}"
        )
    if unexpected:
        problems.append(
            f"checkpoint holds {len(unexpected)} weight(s) the architecture has no place for: "
            f"{_few(unexpected)}"
        )
    if errors:
        problems.append(f"its weights did not load ({errors[0].strip().splitlines()[0][:200]})")
    if problems:
        why = ("refusing to run on randomly initialised weights" if missing or mismatched
               else "the checkpoint does not match its config.json")
        raise CwaError(f"--model {name}: " + "; ".join(problems) + f"; {why}")


def _mismatch(m) -> str:
    if isinstance(m, (tuple, list)) and len(m) == 3:
        return f"{m[0]} (checkpoint {list(m[1])}, model {list(m[2])})"
    return str(m)


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# A tokenizer.json beside a .gguf wins over the GGUF's own vocabulary in transformers'
# tokenizer loader, which then also drops the special tokens (no BOS/EOS): a GGUF converted
# into its HF model's folder would silently lose the BOS of every window.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _gguf_tokenizer(p: Path, trust_remote_code: bool):
    """The tokenizer a GGUF file describes, loaded with that file alone in view."""
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
    """One line naming the real cause; the "not available offline" hint only for an error
    that is about files missing from the local cache or an unreachable hub."""
    msg = _first_line(e)
    if "custom code" in msg or "trust_remote_code" in msg:
        return (
            f"--model {model}: its code would have to run to load it; pass --trust-remote-code "
            "only if you trust its source"
        )
    if "Weights only load failed" in msg:  # torch.load(weights_only=True) refused a pickle
        msg = "its .bin checkpoint holds pickled objects that are not plain tensors; cwa never unpickles them"
    if source == "hub" and _is_cache_miss(e):
        return (
            f"--model {model}: cannot load it ({msg[:200]}); it is not available offline — "
            f"download it first (hf download {model}) or pass a local directory"
        )
    return f"--model {model or 'embedded'}: cannot load it ({msg[:200]})"


_CACHE_MISS = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout",
               "TimeoutException", "ConnectionError")
_CACHE_MISS_TEXT = ("couldn't connect", "offline mode", "local_files_only", "cached files", "local cache")


def _is_cache_miss(e: BaseException) -> bool:
    """A file the cache does not hold and the hub could not give (transformers words it as
    an OSError; the cause chain carries huggingface_hub's error)."""
    seen = 0
    while e is not None and seen < 8:
        if type(e).__name__ in _CACHE_MISS or any(t in str(e).lower() for t in _CACHE_MISS_TEXT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


# --------------------------------------------------------------------------- fingerprints


def weight_files(folder: Path) -> tuple[str | None, list[Path]]:
    """("safetensors" | "pickle" | None, files): the weight files transformers would load from
    `folder` — `model.safetensors` or the shards its index names, else the same for
    `pytorch_model.bin`, else whatever files of that kind are there."""
    if not folder.is_dir():
        return None, []
    st = _named_weights(folder, "model.safetensors") or sorted(folder.glob("*.safetensors"))
    if st:
        return "safetensors", st
    pk = _named_weights(folder, "pytorch_model.bin") or sorted(
        p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
    )
    return ("pickle", pk) if pk else (None, [])


def _named_weights(folder: Path, single: str) -> list[Path]:
    if (folder / single).is_file():
        return [folder / single]
    index = folder / f"{single}.index.json"
    if not index.is_file():
        return []
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CwaError(
            f"--model: {index} is not a valid weight index; the checkpoint is corrupt "
            "(download or save it again)"
        ) from None
    return [folder / s for s in shards]


def checkpoint_fingerprint(checkpoint_dir: Path, commit: str | None = None) -> str | None:
    """Fingerprint of the model stored in `checkpoint_dir` (see the module docstring); None
    when it holds no weight files."""
    kind, files = weight_files(checkpoint_dir)
    if not files:
        return None
    h = hashlib.sha256(f"{FINGERPRINT_VERSION}|commit={commit}\n".encode())
    for f in files:
        if kind == "safetensors":  # the header first: a corrupt file fails before it is read
            for name, (shape, dtype) in sorted(_safetensors_header(f).items()):
                h.update(f"{name}|{shape}|{dtype}\n".encode())
        h.update(f"file={f.name}|{kind}|sha256={_file_hash(f)}\n".encode())
    cfg = checkpoint_dir / "config.json"
    if cfg.is_file():
        h.update(f"config.json|sha256={_file_hash(cfg)}\n".encode())
    return h.hexdigest()


def gguf_fingerprint(path: Path) -> str:
    """Fingerprint of a GGUF file: the SHA-256 of its full content (header, metadata and
    every tensor are in the one file)."""
    return hashlib.sha256(f"{FINGERPRINT_VERSION}|gguf|sha256={_file_hash(path)}\n".encode()).hexdigest()


def model_fingerprint(model, checkpoint_dir: Path | None = None, commit: str | None = None) -> str:
    """Fingerprint of the stored model (see module docstring); falls back to the full bytes
    of the loaded parameters and buffers when there are no files to hash (then the loaded
    dtype does show in it: it is all there is)."""
    if checkpoint_dir is not None:
        fp = checkpoint_fingerprint(checkpoint_dir, commit)
        if fp is not None:
            return fp
    import torch

    h = hashlib.sha256(f"{FINGERPRINT_VERSION}|loaded|commit={commit}\n".encode())
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _file_hash(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as e:
        raise CwaError(
            f"--model: cannot read {path} ({e.strerror or e}); the checkpoint is incomplete "
            "(download or save it again)"
        ) from None


def _safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, stored dtype) from a safetensors header, which is all that is read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(size - 8, _MAX_HEADER):  # never trust a length from a corrupt file
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        return {k: (tuple(int(x) for x in v["shape"]), str(v["dtype"]))
                for k, v in header.items() if k != "__metadata__"}
    except OSError as e:
        raise CwaError(f"--model: cannot read {path} ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError, AttributeError):  # JSONDecodeError, UnicodeDecodeError included
        raise CwaError(
            f"--model: {path} is not a valid safetensors file; the checkpoint is corrupt or "
            "incomplete (download or save it again)"
        ) from None


# --------------------------------------------------------------------------- file hashes


def hash_cache_path() -> Path:
    """The memo of file hashes: `file_sha256.json` in `cwa.memo.cache_dir()`
    (`$CWA_CACHE_DIR`, else `$XDG_CACHE_HOME/cwa`, else `~/.cache/cwa`)."""
    return cache_dir() / "file_sha256.json"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's full content, memoized by real path and `cwa.memo.stamp`.

    A hub cache blob (`models--*/blobs/<64 hex>`) is named by the SHA-256 of its content (a
    Git LFS object id), so its name is returned without reading it. A file whose mtime is
    within 2 s of the hash is not memoized: on a file system with coarse timestamps it could
    be rewritten within the same tick, same size, and look unchanged (git's "racily clean"
    rule); it is hashed again next time, once it is older."""
    real = os.path.realpath(path)
    if _is_hub_blob(real):
        return os.path.basename(real)
    st = os.stat(real)
    stamp = file_stamp(st)
    memo = hash_cache_path()
    entry = read_memo(memo).get(real)
    if (isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items())
            and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
        return entry["sha256"]
    started = time.time_ns()
    digest = _sha256_of_file(real)
    unchanged = file_stamp(os.stat(real)) == stamp
    if unchanged and old_enough(st, started):  # read whole, and old enough to trust
        write_memo(memo, real, {**stamp, "sha256": digest})
    return digest


def _is_hub_blob(real: str) -> bool:
    p = Path(real)
    in_hub_cache = p.parent.name == "blobs" and p.parent.parent.name.startswith("models--")
    return in_hub_cache and bool(_SHA256.fullmatch(p.name))


def _sha256_of_file(path: str) -> str:
    """The full-content hash, from a read-only memory map (no copy into a buffer:
    1.35-1.40 GB/s here against 0.83-1.03 GB/s with readinto, measured on a 2 GiB file in the page cache); streamed
    reads where a file cannot be mapped (empty, or a file system without mmap)."""
    import mmap

    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        try:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty file, or not mappable
            m = None
        if m is not None:
            with m:
                view = memoryview(m)
                try:
                    for i in range(0, len(m), _READ_SIZE):
                        h.update(view[i : i + _READ_SIZE])
                finally:
                    view.release()
            return h.hexdigest()
        buf = bytearray(_READ_SIZE)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


