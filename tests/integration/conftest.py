"""Tiny models built from a config (no hub), with a small byte-level BPE tokenizer."""

from __future__ import annotations

import random

import pytest

WORDS = (
    "the a model weight layer token gradient loss value error score rank seed data window "
    "python function class return import module string list dict set tuple object method "
    "is are was be has have can will not and or of to in for with on by at from"
).split()


def make_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(n_words):
        out.append(rng.choice(WORDS))
        if i % 12 == 11:
            out.append(".\n")
    return " ".join(out)


def make_tokenizer(vocab_size: int = 200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([make_text(2000, s) for s in range(3)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def build_tiny(path, arch: str = "gpt2", tied: bool = True, n_positions: int = 64, dtype=None):
    """Save a tiny randomly initialised causal LM + tokenizer to `path`; return the path."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tok = make_tokenizer()
    v = len(tok)
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=v, n_positions=n_positions,
                         tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    else:
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=v, max_position_embeddings=n_positions,
                          tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2", tied=True)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny_llama"), "llama", tied=False)


@pytest.fixture(scope="session")
def text_docs(tmp_path_factory):
    """A directory of 12 .txt documents and a single .txt of the same text."""
    d = tmp_path_factory.mktemp("docs")
    docs = [make_text(300, 100 + i) for i in range(12)]
    for i, t in enumerate(docs):
        (d / f"doc{i:02d}.txt").write_text(t)
    return d, docs


@pytest.fixture(scope="module")
def k(tmp_path_factory, tiny_gpt2, tiny_llama):
    """The shared artifacts of `reliability_util.kit` (built once per session directory)."""
    from tests.integration.reliability_util import kit

    return kit(tmp_path_factory.getbasetemp(), tiny_gpt2, tiny_llama)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty, offline HF hub cache in tmp (the hub reads its constants at import)."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return cache
