"""Train the embedded default model: a byte-level BPE tokenizer and a small GPT-2.

Run by hand, never in CI (about 7 minutes on a 2-core CPU)::

    python -m cwa.assets.build_model            # train, evaluate, save, rewrite hashes
    python -m cwa.assets.build_model --dry-run  # train and evaluate only, save nothing
    python -m cwa.assets.build_model --card-only  # rewrite MODEL_CARD.md from the record

Why a model of our own: `cwa run` must work offline, out of the box, in seconds, and on a
model that really is GPT-2's architecture (so GPT-2's ``Conv1D``, stored ``(in, out)``,
is exercised by default). The model is trained only on the *train* part of the embedded
corpus (`cwa.assets.corpus_split`), so the calibration and evaluation parts that `cwa`
uses are held out.

What it does, in order:

1. trains a byte-level BPE tokenizer (the GPT-2 scheme: ``<|endoftext|>`` is BOS, EOS and
   UNK; no prefix space) on the train documents;
2. cuts the documents into windows exactly as `cwa` does (SPEC, "Windows"): each document
   tokenized without special tokens, documents joined with EOS, the stream cut into
   non-overlapping pieces of ``seq_len - 1`` tokens, each prefixed with BOS, the trailing
   remainder dropped. For training only, windows start at random offsets of the train
   stream (augmentation); evaluation uses the fixed non-overlapping windows;
3. trains a GPT-2 (tied input embedding and output head) with AdamW, linear warmup and
   cosine decay, seeded, single process, deterministic algorithms on. The loss of a window
   is the mean next-token NLL over positions ``1 .. T-1``: BOS is never a target;
4. evaluates on all windows of the evaluation part: perplexity and token accuracy, against
   two data-only baselines computed from train token counts (always predicting the most
   frequent train token; a unigram model with add-one smoothing);
5. saves the model (float32 safetensors) and the tokenizer to ``cwa/assets/model``, writes
   ``training_settings.json`` and ``cwa/assets/MODEL_CARD.md``, and rewrites the
   ``MODEL_SHA256`` block of ``cwa/assets/__init__.py``.

Bit-for-bit reproducibility holds only with the same library versions on the same kind of
machine; the versions used are recorded in ``training_settings.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cwa.assets import (
    ASSETS_DIR,
    CORPUS_SHA256,
    EMBEDDED_MODEL_NAME,
    MODEL_DIR,
    _sha256_file,
    corpus_split,
    split_documents,
)

SPECIAL_TOKEN = "<|endoftext|>"
MAX_MODEL_DIR_BYTES = 5_000_000
MODEL_CARD_PATH = ASSETS_DIR / "MODEL_CARD.md"

# Every setting that influences the result; recorded verbatim in training_settings.json.
SETTINGS: dict = {
    "seed": 0,
    # tokenizer
    "vocab_size": 2048,
    "bpe_min_frequency": 2,
    # model (GPT-2 architecture)
    "n_positions": 256,
    "n_embd": 128,
    "n_layer": 4,
    "n_head": 4,
    "dropout": 0.1,
    # data
    "seq_len": 256,
    # optimisation
    "batch_size": 16,
    "steps": 800,
    "warmup_steps": 40,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "betas": [0.9, 0.95],
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "num_threads": 2,
    "eval_every": 100,
    "eval_batch_size": 32,
}


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int, min_frequency: int):
    """Train a GPT-2-style byte-level BPE on ``docs`` and wrap it for transformers.

    The raw `tokenizers` model is wrapped in ``GPT2Tokenizer`` (transformers' fast GPT-2
    tokenizer) with ``<|endoftext|>`` as BOS, EOS and UNK, as in GPT-2, so that
    ``AutoTokenizer.from_pretrained`` loads it offline from ``tokenizer.json``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(docs, trainer=trainer)
    model = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = GPT2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=SPECIAL_TOKEN,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        add_prefix_space=False,
    )
    tokenizer.model_max_length = SETTINGS["seq_len"]
    # The wrapper must tokenize exactly like the trained model.
    probe = "\n".join(docs[:3])
    if tokenizer(probe, add_special_tokens=False)["input_ids"] != raw.encode(probe).ids:
        raise RuntimeError("wrapped tokenizer disagrees with the trained BPE")
    return tokenizer


# ----------------------------------------------------------------------------- windows


def token_stream(tokenizer, docs: list[str]) -> list[int]:
    """Tokenize each document without special tokens and join them with EOS."""
    stream: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            stream.append(tokenizer.eos_token_id)
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return stream


def make_windows(tokenizer, docs: list[str], seq_len: int):
    """Windows as in the SPEC: ``[BOS] + (seq_len - 1)`` stream tokens, remainder dropped.

    Returns a ``[N, seq_len]`` int64 tensor.
    """
    import torch

    stream = token_stream(tokenizer, docs)
    piece = seq_len - 1
    n = len(stream) // piece
    body = torch.tensor(stream[: n * piece], dtype=torch.long).view(n, piece)
    bos = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long)
    return torch.cat([bos, body], dim=1)


def window_nll(logits, input_ids):
    """Per-token next-token NLL ``[N, T-1]`` in float32: position 0 (BOS) is no target."""
    import torch.nn.functional as F

    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return nll.view(targets.shape)


def evaluate(model, windows, batch_size: int) -> dict:
    """Mean NLL, perplexity and token accuracy over all targets of ``windows`` (eval mode)."""
    import torch

    was_training = model.training
    model.eval()
    total_nll = 0.0
    correct = 0
    count = 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            logits = model(input_ids=batch).logits
            total_nll += window_nll(logits, batch).double().sum().item()
            correct += (logits[:, :-1].argmax(-1) == batch[:, 1:]).sum().item()
            count += batch[:, 1:].numel()
    model.train(was_training)
    nll = total_nll / count
    return {
        "nll": nll,
        "perplexity": math.exp(nll),
        "token_accuracy": correct / count,
        "windows": len(windows),
        "targets": count,
    }


def baselines(train_stream: list[int], eval_windows, vocab_size: int) -> dict:
    """Data-only baselines on the evaluation targets, from train token counts.

    * most-frequent-token: always predict the most frequent train token;
    * unigram: predict the train unigram distribution with add-one (Laplace) smoothing,
      so that tokens unseen in train keep a finite probability.
    """
    counts = Counter(train_stream)
    top_id, _ = counts.most_common(1)[0]
    targets = eval_windows[:, 1:].reshape(-1).tolist()
    denom = len(train_stream) + vocab_size
    unigram_nll = -sum(math.log((counts.get(t, 0) + 1) / denom) for t in targets) / len(targets)
    return {
        "most_frequent_token_id": top_id,
        "most_frequent_token_accuracy": sum(t == top_id for t in targets) / len(targets),
        "unigram_nll": unigram_nll,
        "unigram_perplexity": math.exp(unigram_nll),
    }


# ---------------------------------------------------------------------------- training


def build_model(tokenizer, settings: dict):
    """A GPT-2 with tied input embedding and output head, initialised from the seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=settings["n_positions"],
        n_embd=settings["n_embd"],
        n_layer=settings["n_layer"],
        n_head=settings["n_head"],
        resid_pdrop=settings["dropout"],
        embd_pdrop=settings["dropout"],
        attn_pdrop=settings["dropout"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def lr_at(step: int, settings: dict) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the end."""
    lr, warmup, steps = settings["lr"], settings["warmup_steps"], settings["steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = lr * settings["min_lr_ratio"]
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(model, train_stream: list[int], bos_id: int, monitor_windows, settings: dict) -> dict:
    """AdamW on random-offset windows of the train stream; returns a training log.

    ``monitor_windows`` (calibration windows) are only evaluated for the log, to watch for
    over-fitting; they never influence the weights.
    """
    import torch

    seq_len, batch_size = settings["seq_len"], settings["batch_size"]
    piece = seq_len - 1
    stream = torch.tensor(train_stream, dtype=torch.long)
    generator = torch.Generator().manual_seed(settings["seed"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings["lr"],
        betas=tuple(settings["betas"]),
    )
    offsets_arange = torch.arange(piece)
    bos = torch.full((batch_size, 1), bos_id, dtype=torch.long)
    model.train()
    log: list[dict] = []
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(settings["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        offsets = torch.randint(0, len(stream) - piece + 1, (batch_size, 1), generator=generator)
        batch = torch.cat([bos, stream[offsets + offsets_arange]], dim=1)
        loss = window_nll(model(input_ids=batch).logits, batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
        optimizer.step()
        recent.append(loss.item())
        if (step + 1) % settings["eval_every"] == 0 or step + 1 == settings["steps"]:
            monitor = evaluate(model, monitor_windows, settings["eval_batch_size"])
            entry = {
                "step": step + 1,
                "train_loss": sum(recent) / len(recent),
                "calibration_nll": monitor["nll"],
                "seconds": round(time.perf_counter() - start, 1),
            }
            log.append(entry)
            recent = []
            print(
                f"step {entry['step']:5d}  train {entry['train_loss']:.4f}  "
                f"calibration {entry['calibration_nll']:.4f}  {entry['seconds']:.0f}s",
                flush=True,
            )
    return {"log": log, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------ saving


def rewrite_model_hashes(hashes: dict[str, str]) -> None:
    """Replace the ``MODEL_SHA256`` block between its markers in ``cwa/assets/__init__.py``."""
    init = ASSETS_DIR / "__init__.py"
    text = init.read_text(encoding="utf-8")
    lines = "".join(f'    "{name}": "{digest}",\n' for name, digest in sorted(hashes.items()))
    block = (
        f"# BEGIN MODEL_SHA256\nMODEL_SHA256: dict[str, str] = {{\n{lines}}}\n# END MODEL_SHA256"
    )
    new, n = re.subn(
        r"# BEGIN MODEL_SHA256\n.*?# END MODEL_SHA256", lambda _: block, text, flags=re.DOTALL
    )
    if n != 1:
        raise RuntimeError(f"MODEL_SHA256 markers not found exactly once in {init}")
    init.write_text(new, encoding="utf-8")


def write_model_card(record: dict) -> None:
    """Write the short human-readable summary ``cwa/assets/MODEL_CARD.md``."""
    card = (
        _card_architecture(record)
        + _card_data(record)
        + _card_training(record)
        + _card_results(record)
    )
    MODEL_CARD_PATH.write_text(card, encoding="utf-8")


def _card_architecture(record: dict) -> str:
    s = record["settings"]
    return f"""# {EMBEDDED_MODEL_NAME}

The default model of `cwa`: a small GPT-2-architecture causal language model with its own
byte-level BPE tokenizer, trained from scratch on the *train* part of the embedded corpus
by `python -m cwa.assets.build_model` (never in CI). It exists so that `cwa run` works
offline in seconds on a real GPT-2 (`transformers.pytorch_utils.Conv1D` layers, stored
`(in, out)`). It is a test subject, not a useful language model.

## Architecture

- `GPT2LMHeadModel`: {s["n_layer"]} layers, {s["n_head"]} heads, width {s["n_embd"]},
  MLP width {4 * s["n_embd"]}, context {s["n_positions"]}, vocabulary {record["vocab_size"]},
  input embedding tied to the output head.
- {record["parameters"]:,} parameters, float32 safetensors; the model directory is
  {record["model_dir_bytes"]:,} bytes.
- Tokenizer: byte-level BPE (GPT-2 scheme, no prefix space), `<|endoftext|>` is BOS, EOS
  and UNK.

"""


def _card_data(record: dict) -> str:
    s, sp = record["settings"], record["split"]
    return (
        f"""## Data

The embedded corpus: CPython 3.11.7's `pydoc_data.topics` (English help texts of the
standard library), PSF License Version 2 (see `corpus/LICENSE-PSF.txt`), SHA-256
`{CORPUS_SHA256}`. Split by `cwa.assets.corpus_split()`:

| part | topics | characters | tokens | windows of {s["seq_len"]} |
|---|---|---|---|---|
"""
        + "".join(
            f"| {p} | {sp[p]['topics']} | {sp[p]['characters']:,} | {sp[p]['tokens']:,} | {sp[p]['windows']} |\n"
            for p in ("train", "calibration", "evaluation")
        )
        + f"""
The tokenizer and the model saw only the train part. Windows: documents tokenized without
special tokens, joined with EOS, cut into `[BOS] + {s["seq_len"] - 1}` tokens; training
windows start at random offsets of the train stream.

"""
    )


def _card_training(record: dict) -> str:
    s, load = record["settings"], record["load_average_1min_before_after"]
    return f"""## Training

AdamW (betas {s["betas"]}, weight decay {s["weight_decay"]} on matrices), {s["steps"]}
steps of {s["batch_size"]} windows, learning rate {s["lr"]} with {s["warmup_steps"]} warmup
steps and cosine decay to {s["lr"] * s["min_lr_ratio"]:g}, gradient clipping
{s["grad_clip"]}, dropout {s["dropout"]}, seed {s["seed"]}, deterministic algorithms, one
process with {s["num_threads"]} threads. {record["training_seconds"]:.0f} s on
{record["machine"]} (1-minute load average {load[0]} before, {load[1]} after; above 2,
other processes shared the cores and slowed training down). torch {record["versions"]["torch"]}, transformers
{record["versions"]["transformers"]}, tokenizers {record["versions"]["tokenizers"]}.
All settings: `model/training_settings.json`. Only the calibration loss was watched
during training; the evaluation part gives the numbers below and nothing else.

"""


def _card_results(record: dict) -> str:
    r, b = record["results"], record["results"]["baselines"]
    ev, cal, tr = r["evaluation"], r["calibration"], r["train"]
    return f"""## Results (eval mode, mean next-token NLL over the targets, BOS excluded)

| part | windows | NLL | perplexity | token accuracy |
|---|---|---|---|---|
| train (fixed windows) | {tr["windows"]} | {tr["nll"]:.3f} | {tr["perplexity"]:.1f} | {tr["token_accuracy"]:.3f} |
| calibration | {cal["windows"]} | {cal["nll"]:.3f} | {cal["perplexity"]:.1f} | {cal["token_accuracy"]:.3f} |
| evaluation | {ev["windows"]} | {ev["nll"]:.3f} | {ev["perplexity"]:.1f} | {ev["token_accuracy"]:.3f} |

Baselines on the evaluation targets, from train token counts: always predicting the most
frequent train token ({b["most_frequent_token"]!r}) gives accuracy {b["most_frequent_token_accuracy"]:.3f}
(the model's is {ev["token_accuracy"] / b["most_frequent_token_accuracy"]:.1f}x higher); a
unigram model (add-one smoothing) has perplexity {b["unigram_perplexity"]:.1f}; a uniform
guess has perplexity {record["vocab_size"]}.

## License

The model weights and tokenizer are derived from the PSF-licensed corpus above; the
training texts are unchanged Python documentation (notice in `corpus/LICENSE-PSF.txt`).
"""


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


# -------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args, settings = _parse_args(argv)
    if args.card_only:
        _rewrite_card()
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import platform

    import tokenizers
    import torch
    import transformers

    torch.set_num_threads(settings["num_threads"])
    torch.manual_seed(settings["seed"])
    torch.use_deterministic_algorithms(True)

    t_start = time.perf_counter()
    # Other processes on a shared machine slow training down: record the load so that
    # the training time can be judged.
    load_before = os.getloadavg()
    tokenizer, streams, windows, split_info = _prepare_corpus(settings)
    model = build_model(tokenizer, settings)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")
    training = train(
        model, streams["train"], tokenizer.bos_token_id, windows["calibration"], settings
    )
    model.eval()
    results = _evaluate_parts(model, tokenizer, streams, windows, settings)
    load_after = os.getloadavg()
    if args.dry_run:
        return

    _save_model(model, tokenizer)
    record = {
        "model_name": EMBEDDED_MODEL_NAME,
        "settings": settings,
        "corpus_sha256": CORPUS_SHA256,
        "split": split_info,
        "vocab_size": len(tokenizer),
        "parameters": n_params,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "machine": f"{platform.machine()} CPU, {settings['num_threads']} threads",
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "training_seconds": round(training["seconds"], 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "training_log": training["log"],
        "results": results,
    }
    _write_record(record)


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """The command line, and the settings with its `--set` overrides applied."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="train and evaluate, save nothing")
    parser.add_argument(
        "--card-only",
        action="store_true",
        help="only rewrite MODEL_CARD.md from model/training_settings.json (no training)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting (for experiments), e.g. --set steps=200",
    )
    args = parser.parse_args(argv)
    settings = dict(SETTINGS)
    if args.card_only:
        return args, settings
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in settings:
            parser.error(f"unknown setting {key}")
        settings[key] = (
            type(settings[key])(value) if not isinstance(settings[key], list) else json.loads(value)
        )
    return args, settings


def _rewrite_card() -> None:
    """`--card-only`: the card from the saved record (no training)."""
    # The card lies outside MODEL_DIR (not hashed): its wording can change freely.
    record = json.loads((MODEL_DIR / "training_settings.json").read_text(encoding="utf-8"))
    record["model_dir_bytes"] = directory_bytes(MODEL_DIR)
    write_model_card(record)
    print(f"rewrote {MODEL_CARD_PATH}")


def _prepare_corpus(
    settings: dict,
) -> tuple[Any, dict[str, list[int]], dict[str, Any], dict[str, dict]]:
    """The tokenizer trained on the train part, each part's token stream and windows, and
    the split's summary (printed)."""
    split = corpus_split()
    docs = {part: split_documents(part) for part in split}
    tokenizer = train_tokenizer(
        docs["train"], settings["vocab_size"], settings["bpe_min_frequency"]
    )
    streams = {part: token_stream(tokenizer, docs[part]) for part in docs}
    windows = {part: make_windows(tokenizer, docs[part], settings["seq_len"]) for part in docs}
    split_info = {
        part: {
            "topics": len(split[part]),
            "names": split[part],
            "characters": sum(len(d) for d in docs[part]),
            "tokens": len(streams[part]),
            "windows": len(windows[part]),
        }
        for part in split
    }
    for part, info in split_info.items():
        print(
            f"{part:12s} {info['topics']:3d} topics {info['characters']:7d} chars "
            f"{info['tokens']:6d} tokens {info['windows']:4d} windows"
        )
    return tokenizer, streams, windows, split_info


def _evaluate_parts(model, tokenizer, streams: dict, windows: dict, settings: dict) -> dict:
    """Each part's results and the baselines, printed (with a warning when the model
    barely beats the most-frequent-token baseline)."""
    results = {part: evaluate(model, windows[part], settings["eval_batch_size"]) for part in windows}
    results["baselines"] = baselines(streams["train"], windows["evaluation"], len(tokenizer))
    results["baselines"]["most_frequent_token"] = tokenizer.decode(
        [results["baselines"]["most_frequent_token_id"]]
    )
    ev, base = results["evaluation"], results["baselines"]
    print(
        f"evaluation: perplexity {ev['perplexity']:.2f}, token accuracy {ev['token_accuracy']:.4f}; "
        f"most-frequent-token accuracy {base['most_frequent_token_accuracy']:.4f}, "
        f"unigram perplexity {base['unigram_perplexity']:.2f}"
    )
    ratio = ev["token_accuracy"] / base["most_frequent_token_accuracy"]
    if ratio < 3:
        print(f"WARNING: token accuracy only {ratio:.2f}x the most-frequent-token baseline")
    return results


def _save_model(model, tokenizer) -> None:
    """A fresh MODEL_DIR holding the model and tokenizer, world-readable."""
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    MODEL_DIR.mkdir(parents=True)
    model.save_pretrained(MODEL_DIR)
    tokenizer.save_pretrained(MODEL_DIR)
    for path in MODEL_DIR.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the package must be world-readable


def _write_record(record: dict) -> None:
    """training_settings.json, the model card and the MODEL_SHA256 block."""
    settings_path = MODEL_DIR / "training_settings.json"
    settings_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    # Known only once every file is written, so it goes into the model card only.
    record["model_dir_bytes"] = directory_bytes(MODEL_DIR)
    size = record["model_dir_bytes"]
    if size > MAX_MODEL_DIR_BYTES:
        raise RuntimeError(f"model directory is {size} bytes, over {MAX_MODEL_DIR_BYTES}")
    write_model_card(record)
    hashes = {p.name: _sha256_file(p) for p in sorted(MODEL_DIR.iterdir()) if p.is_file()}
    rewrite_model_hashes(hashes)
    print(f"saved {len(hashes)} files, {size:,} bytes, to {MODEL_DIR}; MODEL_SHA256 rewritten")


if __name__ == "__main__":
    main()
