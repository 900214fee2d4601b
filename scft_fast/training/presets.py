"""Built-in model presets: small random-initialized Llama-architecture models over the embedded tokenizer."""
from __future__ import annotations

# Sized so that the default run (200 steps of 16 embedded samples) takes well under 3 minutes on 2 CPU cores.
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
    "tiny-tied": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True),
}


def build_preset(name: str, tokenizer, max_position_embeddings: int = 2048):
    """(causal LM, tokenizer) for a preset; the model's vocabulary and special ids follow the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)} (or pass a local model path)")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa", **PRESETS[name])
    return LlamaForCausalLM(config)
