"""Built-in model presets (small random-initialized Llama models over the embedded tokenizer), and the factory of
small random models that the tests and benchmarks build."""
from __future__ import annotations

from dataclasses import asdict

from .config import SCFT_CONFIG_KEY, SCFTConfig
from .patch import scft_class

# Sized so that the default run (200 steps of 16 embedded samples) takes well under 3 minutes on 2 CPU cores.
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
    "tiny-tied": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True),
}


# The architectures the tests and benchmarks build small random models of: (config class, causal LM class).
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
}


def causal_lm_config(arch: str = "llama", tokenizer=None, **fields):
    """The transformers config of a small ``arch`` model: ``fields`` as given; with a tokenizer, its vocabulary
    size and special ids unless ``fields`` set them."""
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    if tokenizer is not None:
        fields = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                  "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **fields}
    return getattr(transformers, ARCHITECTURES[arch][0])(**fields)


def random_causal_lm(arch: str = "llama", tokenizer=None, seed: int | None = None, **fields):
    """A random-initialized ``arch`` causal LM over ``causal_lm_config(arch, tokenizer, **fields)``, drawn after
    ``torch.manual_seed(seed)`` when a seed is given: the one small-model factory of the tests and benchmarks."""
    import torch
    import transformers

    config = causal_lm_config(arch, tokenizer, **fields)
    if seed is not None:
        torch.manual_seed(seed)
    return getattr(transformers, ARCHITECTURES[arch][1])(config)


def preset_config(name: str, tokenizer, max_position_embeddings: int = 2048):
    """The preset's LlamaConfig; its vocabulary and special ids follow the tokenizer."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)} (or pass a local model path)")
    return causal_lm_config("llama", tokenizer, max_position_embeddings=max_position_embeddings,
                            attn_implementation="sdpa", **PRESETS[name])


def build_preset(name: str, tokenizer, scft: SCFTConfig | None = None, max_position_embeddings: int = 2048):
    """The preset as a random-initialized causal LM; with ``scft``, the patched class with its head.

    Under ZeRO-3 (transformers' HfDeepSpeedConfig alive) ``_from_config`` builds it inside ``deepspeed.zero.Init``
    and rank 0 initializes one module at a time (initialize_weights_zero3). On one process it is built the same
    way without the partitioning: construction without initialization, then ``initialize_weights``, which draws
    in the same module order, so a seed gives the same weights on one process and under ZeRO-3."""
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations import is_deepspeed_zero3_enabled

    config = preset_config(name, tokenizer, max_position_embeddings)
    model_class = LlamaForCausalLM
    if scft is not None:
        setattr(config, SCFT_CONFIG_KEY, asdict(scft))
        model_class = scft_class(LlamaForCausalLM)
    if is_deepspeed_zero3_enabled():
        return model_class._from_config(config)
    with no_init_weights():
        model = model_class(config)
    model.initialize_weights()
    model.tie_weights()
    return model
