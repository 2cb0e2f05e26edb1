"""What differs per architecture in a GGUF file: llama.cpp's tensor names, layouts and hyperparameter keys.

Each entry follows llama.cpp's own converter (convert_hf_to_gguf.py and conversion/{llama,qwen,gpt2}.py) and the
tensors llama.cpp's loader asks for (src/models/*.cpp). transformers' GGUF loader reads all three back, which is
what the export verifies against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

# HF module inside a decoder layer -> llama.cpp name inside blk.N (Llama and Qwen2 share the layout)
LLAMA_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
LLAMA_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GPT2_LAYER = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
GPT2_TOP = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
            "lm_head": "output"}


@dataclass(frozen=True)
class Arch:
    gguf: str                                 # general.architecture
    layer_prefix: str                         # HF prefix of decoder layer N (then "N.")
    layer: dict
    top: dict
    problems: Callable[[object], list[str]]   # what llama.cpp or transformers' GGUF reader would treat otherwise
    hparams: Callable[[object, int], list]    # (GGUFWriter add_<key>, value) pairs
    permute_qk: bool = False                  # llama.cpp's Llama rope pairs adjacent rows, HF rotates halves
    transposed: bool = False                  # GPT-2's Conv1D stores (in, out): llama.cpp wants (out, in)

    def module(self, hf_module: str) -> Optional[str]:
        """HF module path (no .weight/.bias) -> llama.cpp tensor stem, or None when it has no equivalent."""
        if hf_module in self.top:
            return self.top[hf_module]
        if not hf_module.startswith(self.layer_prefix):
            return None
        n, _, rest = hf_module[len(self.layer_prefix):].partition(".")
        return f"blk.{n}.{self.layer[rest]}" if n.isdigit() and rest in self.layer else None

    def heads(self, stem: str, c) -> Optional[int]:
        """Heads whose rows llama.cpp orders differently (Llama Q and K), else None."""
        if not self.permute_qk:
            return None
        return c.num_attention_heads if stem.endswith(".attn_q") else c.num_key_value_heads if stem.endswith(".attn_k") else None


def _rope(c) -> dict:
    return getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _llama_like_problems(c, biases_ok: bool) -> list[str]:
    rope = _rope(c)
    return [f"rope type {rope.get('rope_type')!r}" if rope.get("rope_type", "default") != "default" else "",
            "attention/MLP biases" if not biases_ok and (getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False)) else "",
            "sliding-window attention" if getattr(c, "use_sliding_window", False) else "",
            f"activation {c.hidden_act!r}" if c.hidden_act != "silu" else ""]


def _llama_like_hparams(c, n_vocab: int, rope_dims: bool) -> list:
    rope = _rope(c)
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    head_dim = _head_dim(c)
    kv = [("context_length", c.max_position_embeddings), ("embedding_length", c.hidden_size),
          ("block_count", c.num_hidden_layers), ("feed_forward_length", c.intermediate_size),
          ("head_count", c.num_attention_heads), ("head_count_kv", c.num_key_value_heads),
          ("rope_freq_base", theta), ("layer_norm_rms_eps", float(c.rms_norm_eps)), ("vocab_size", n_vocab)]
    if rope_dims:  # transformers reads Llama's head_dim from it
        kv.append(("rope_dimension_count", head_dim))
    if head_dim != c.hidden_size // c.num_attention_heads:  # llama.cpp otherwise derives it from the widths
        kv += [("key_length", head_dim), ("value_length", head_dim)]
    return kv


def _gpt2_problems(c) -> list[str]:
    ff = c.n_inner or 4 * c.n_embd
    return [f"activation {c.activation_function!r}" if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh") else "",
            f"n_inner {c.n_inner} (llama.cpp and transformers' GGUF reader assume 4 x n_embd)" if ff != 4 * c.n_embd else "",
            "scale_attn_by_inverse_layer_idx" if c.scale_attn_by_inverse_layer_idx else "",
            "unscaled attention (scale_attn_weights false)" if not c.scale_attn_weights else "",
            "cross-attention" if c.add_cross_attention else ""]


def _gpt2_hparams(c, n_vocab: int) -> list:
    return [("context_length", c.n_positions), ("embedding_length", c.n_embd), ("feed_forward_length", 4 * c.n_embd),
            ("block_count", c.n_layer), ("head_count", c.n_head), ("layer_norm_eps", float(c.layer_norm_epsilon)),
            ("vocab_size", n_vocab)]


ARCHS = {
    "llama": Arch("llama", "model.layers.", LLAMA_LAYER, LLAMA_TOP, lambda c: _llama_like_problems(c, False),
                  lambda c, n: _llama_like_hparams(c, n, True), permute_qk=True),
    # Qwen2: Llama's layout plus Q/K/V biases; NEOX rope in llama.cpp, so rows stay in HF order
    "qwen2": Arch("qwen2", "model.layers.", LLAMA_LAYER, LLAMA_TOP, lambda c: _llama_like_problems(c, True),
                  lambda c, n: _llama_like_hparams(c, n, False)),
    "gpt2": Arch("gpt2", "transformer.h.", GPT2_LAYER, GPT2_TOP, _gpt2_problems, _gpt2_hparams, transposed=True),
}
FAMILIES = "llama (Llama, SmolLM2, ...), qwen2 (Qwen2, Qwen2.5), gpt2 (GPT-2, DistilGPT2)"


def get_arch(model_type) -> Optional[Arch]:
    return ARCHS.get(model_type)


def permute(w, n_head: int):
    """llama.cpp's Q/K row order: HF rotates halves of each head, llama.cpp adjacent pairs (K: the KV heads).
    Acts on rows only, so it serves a weight (out, in), a bias (out,) and a LoRA B (out, r) alike."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
