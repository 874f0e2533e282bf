"""Write a GGUF file from a tiny HF Llama directory, the way llama.cpp's converter does.

Only what transformers' GGUF loader reads is written: the `llama.*` hyperparameters, F32
tensors under llama.cpp's names (q/k rows permuted into llama.cpp's rotary layout, which
transformers undoes on load) and a byte-level BPE (`gpt2`) tokenizer section.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# HF parameter name (after `model.layers.N.`) -> llama.cpp tensor name (after `blk.N.`)
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `permute` for q/k rows (convert_hf_to_gguf.py, LlamaModel.permute):
    per head, the interleaved rotary halves; transformers' `_reverse_permute_weights`
    inverts it. `n_head` is the head count of this projection (the KV heads for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_section(model_dir: Path):
    """Tokens in id order, token types, merges as "a b" strings, and the special ids."""
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    model = tok["model"]
    assert model["type"] == "BPE", model["type"]
    vocab: dict[str, int] = dict(model["vocab"])
    special_ids = set()
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special_ids.add(added["id"])
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    assert all(tokens), "token ids are not contiguous"
    types = [3 if i in special_ids else 1 for i in range(n)]  # 3 = CONTROL, 1 = NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def hf_llama_to_gguf(model_dir, out_path) -> Path:
    """Convert the HF Llama in `model_dir` (config.json, safetensors, tokenizer.json) to an
    F32 GGUF at `out_path`; return the path."""
    import gguf
    from safetensors.numpy import load_file

    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama", cfg["model_type"]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    assert rope.get("rope_type", "default") == "default", rope

    state: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # llama.cpp writes `output` only when untied

    tokens, types, merges = _tokenizer_section(model_dir)
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    ids = {t: i for i, t in enumerate(tokens)}

    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_name("cwa-tiny-llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    else:
        # GGUF has no empty arrays, so a vocabulary without merges (the byte alphabet alone)
        # cannot state "no merges"; scores let transformers derive them (none) instead.
        w.add_token_scores([-float(i) for i in range(len(tokens))])
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("unk_token", w.add_unk_token_id), ("pad_token", w.add_pad_token_id)):
        name = tok_cfg.get(key)
        if isinstance(name, dict):
            name = name.get("content")
        if name is not None and name in ids:
            add(ids[name])
    w.add_add_bos_token(bool(tok_cfg.get("add_bos_token", False)))

    for hf_name in sorted(state):
        arr = np.ascontiguousarray(state[hf_name], dtype=np.float32)
        if hf_name in _TOP_NAMES:
            name = _TOP_NAMES[hf_name]
        else:
            prefix, layer, rest = hf_name.split(".", 3)[1:]
            assert prefix == "layers", hf_name
            name = f"blk.{int(layer)}.{_LAYER_NAMES[rest]}"
            if rest.startswith("self_attn.q_proj"):
                arr = llama_cpp_permute(arr, n_head)
            elif rest.startswith("self_attn.k_proj"):
                arr = llama_cpp_permute(arr, n_kv)
        w.add_tensor(name, np.ascontiguousarray(arr))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path
