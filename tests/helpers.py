"""What the tests share (fixtures live in conftest.py):

- the backends of safety_loss the tests run on, on this machine, and their device;
- random inputs with every kind of row for the op, one call of the op beside its float64 reference on the same
  inputs, and the comparison of the two (tolerances are stated in test_safety_loss.py);
- DeRTa's reference files, read in place from ../shared/data/derta (never copied into the repository);
- an exported model's weights, from one file or from its shards; whether a ZeRO-3 optimizer shares the model's
  partitions as its master weights;
- a tiny, random-initialized model of any causal LM that transformers registers, by its model type.
"""
import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from scft_fast import IGNORE_INDEX, SafetyLossOutput, safety_loss
from scft_fast.ops.reference import safety_loss_ref


def available_backends() -> list[str]:
    """torch always; triton and cpu as soon as their code exists in the package. A backend whose code
    exists but does not load is *not* skipped: its tests then fail, as they should."""
    names = ["torch"]
    if importlib.util.find_spec("triton") is not None and importlib.util.find_spec("scft_fast.kernels.safety_epilogue"):
        names.append("triton")
    if not torch.cuda.is_available() and importlib.util.find_spec("scft_fast.ops.cpu_extension") is not None:
        names.append("cpu")
    return names


def device_for(backend: str) -> torch.device:
    if backend == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def make_inputs(seed, n, h, v, c=2, s=4, dtype=torch.float32, device="cpu", bias=False, cls_bias=False,
                transition=True, head=True, ignored_share=0.35):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (1.0 / h ** 0.5) * 3.0
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored_share] = IGNORE_INDEX
    kw = {}
    if bias:
        kw["lm_bias"] = torch.randn(v, generator=g)
    if transition:
        tr = torch.full((n,), IGNORE_INDEX)
        rto = torch.rand(n, generator=g) < 0.3
        tr[rto] = int(torch.randint(0, v, (1,), generator=g))
        labels[rto & (torch.rand(n, generator=g) < 0.5)] = IGNORE_INDEX  # some rows carry only the transition term
        kw["transition_labels"] = tr
    if head:
        kw["cls_weight"] = torch.randn(c, h, generator=g) * 0.2
        kw["cls_index"] = torch.randint(0, max(n, 1), (s,), generator=g) if n else torch.zeros(0, dtype=torch.long)
        cls_labels = torch.randint(0, c, (s,), generator=g)
        if s > 2:
            cls_labels[1] = IGNORE_INDEX
        kw["cls_labels"] = cls_labels
        if cls_bias:
            kw["cls_bias"] = torch.randn(c, generator=g)
    out = dict(hidden=hidden, lm_weight=weight, labels=labels, **kw)
    return {k: (t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)) for k, t in out.items()}


DIFF = ("hidden", "lm_weight", "lm_bias", "cls_weight", "cls_bias")


def run_both(inputs, backend, grad_scale=1.0, **options):
    """(our output, our grads, reference dict, reference grads) for the same inputs."""
    ours_in = {k: (t.detach().clone().requires_grad_(k in DIFF)) for k, t in inputs.items()}
    out = safety_loss(**ours_in, backend=backend, **options)
    names = [k for k in DIFF if k in ours_in]
    grads = torch.autograd.grad(out.loss * grad_scale, [ours_in[k] for k in names])
    ref_in = {k: (t.detach().cpu().double().requires_grad_(k in DIFF) if t.is_floating_point() else t.cpu())
              for k, t in inputs.items()}
    ref = safety_loss_ref(**ref_in, **{k: v for k, v in options.items() if k != "chunk_size"})
    ref_grads = torch.autograd.grad(ref["loss"] * grad_scale, [ref_in[k] for k in names], allow_unused=True)
    # A parameter the reference never touched (no labeled pooled row, say) has a zero gradient.
    ref_grads = [torch.zeros_like(ref_in[k]) if g is None else g for k, g in zip(names, ref_grads)]
    return out, dict(zip(names, grads)), ref, dict(zip(names, ref_grads))


def close(actual, expected, rtol, atol_rel, what):
    expected = expected.detach().double()
    atol = atol_rel * max(expected.abs().max().item(), 1e-12) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().cpu().double(), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def check(out, grads, ref, ref_grads, rtol=2e-5, atol_rel=2e-5):
    assert isinstance(out, SafetyLossOutput)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    close(out.loss, ref["loss"], rtol, atol_rel, "loss")
    close(out.lm_loss, ref["lm_loss"], rtol, atol_rel, "lm_loss")
    close(out.transition_loss, ref["transition_loss"], rtol, atol_rel, "transition_loss")
    close(out.cls_loss, ref["cls_loss"], rtol, atol_rel, "cls_loss")
    assert int(out.n_lm) == ref["n_lm"] and int(out.n_tr) == ref["n_tr"]
    if ref["cls_logits"] is not None:
        close(out.cls_logits, ref["cls_logits"], rtol, atol_rel, "cls_logits")
    for name, g in grads.items():
        close(g, ref_grads[name], rtol, atol_rel, f"grad {name}")


DERTA = Path(__file__).resolve().parents[2] / "shared" / "data" / "derta"
needs_derta = pytest.mark.skipif(not DERTA.is_dir(), reason=f"DeRTa's reference files are not at {DERTA}")


def load_export(model_dir) -> dict[str, torch.Tensor]:
    """The exported weights, from model.safetensors or from the shards its index lists."""
    from safetensors.torch import load_file

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(model_dir, "model.safetensors"))
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    assert len(files) > 1
    return {k: v for name in files for k, v in load_file(os.path.join(model_dir, name)).items()}


def shares_master_weights(optimizer) -> bool | None:
    """Whether a ZeRO-3 optimizer's master weights are the model's partitions (scft_fast/hf/patches.py);
    None: not a ZeRO-3 optimizer."""
    flat16 = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    flat32 = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if flat16 is None or flat32 is None:
        return None
    return all(a.data_ptr() == b.data_ptr() for a, b in zip(flat16, flat32))


TINY_VOCAB = 96
SIZES = dict(  # set wherever a config (or sub-config) has the attribute
    vocab_size=TINY_VOCAB, hidden_size=32, d_model=32, n_embd=32, embed_dim=32, embedding_size=32, emb_dim=32,
    hidden_size_global=32, intermediate_size=64, ffn_dim=64, d_ff=64, n_inner=64, decoder_ffn_dim=64,
    encoder_ffn_dim=64, ffn_hidden_size=64, feed_forward_size=64,
    num_hidden_layers=2, n_layer=2, n_layers=2, num_layers=2, decoder_layers=2, encoder_layers=2,
    num_attention_heads=4, n_head=4, n_heads=4, num_heads=4, decoder_attention_heads=4, encoder_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rotary_dim=4,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    n_group=1, topk_group=1, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    expert_ffn_hidden_size=32,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    index_topk=4, index_head_dim=8, index_n_heads=2,
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
    vocab_size_per_layer_input=TINY_VOCAB, hidden_size_per_layer_input=8,
    pronunciation_embed_dim=32, pronunciation_vocab_size=32, shape_embed_dim=32, shape_vocab_size=32,
    mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16, state_size=8, chunk_size=16,
    image_size=32, patch_size=8,
)
# Logit scales and soft caps, wherever a config has them: away from neutral, so that a loss that leaves one out
# differs: scales of 1/4 or 4, soft caps of 0.5 (the logits of these tiny models reach about 1: the cap bends them).
LOGIT_SETTINGS = dict(logit_scale=0.25, logits_scaling=4.0, lm_head_multiplier=0.25, logits_mup_width_multiplier=4.0,
                      final_logit_softcapping=0.5, logits_soft_cap=0.5, output_logit_soft_cap=0.5)
MLA = dict(num_key_value_heads=4)  # multi-head latent attention: as many key-value heads as query heads
OVERRIDES = {  # model_type (".sub_config" for a sub-config) -> fields beside SIZES
    **{t: MLA for t in ("axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite",
                        "glm_moe_dsa", "longcat_flash", "minicpm3", "youtu")},
    "kimi_linear": dict(MLA, linear_head_dim=8, linear_num_heads=4, num_local_experts=4),
    "dbrx": dict(attn_config=dict(rope_theta=10000.0, kv_n_heads=2, clip_qkv=8.0)),
    # Dots3: one dense and one expert layer; adapters from the vision and audio towers into the text width
    **{t: dict(num_key_value_heads=4, pyramid_num_routed=[-1, 4])
       for t in ("dots3_note_text", "dots3_note.text_config")},
    "dots3_note.vision_config": dict(num_key_value_heads=4, pyramid_num_routed=[-1, 4], adapter_in_dim=32,
                                     adapter_out_dim=32),
    "dots3_note.audio_config": dict(adapter_input_size=32, adapter_out_dim=32),
    "falcon_h1": dict(mamba_d_ssm=64),
    "mamba2": dict(num_heads=8),  # num_heads * head_dim = 2 * hidden_size
    "gemma3n_text": dict(num_kv_shared_layers=0),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "zamba": dict(num_hidden_layers=4, attn_layer_period=1, attn_layer_offset=0),  # two hybrid layers to tie
    "zamba2": dict(layers_block_type=["linear_attention", "hybrid"]),
    "zaya": dict(num_experts_per_tok=1),
    "reformer": dict(is_decoder=True, attn_layers=["local", "lsh"], axial_pos_shape=[4, 4],
                     axial_pos_embds_dim=[16, 16], local_attn_chunk_length=4, lsh_attn_chunk_length=4,
                     attention_head_size=8, num_buckets=2),
    "cohere_compass_text": dict(rope_parameters={"full_attention": dict(rope_type="default", rope_theta=10000.0,
                                                                        mrope_section=[2, 1, 1])}),
    "blt": dict(encoder_hash_byte_group_vocab=64),
    # hybrids: one attention layer of the two
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
}


def tiny_config(config_class: type, key: str, defaults: dict | None = None, depth: int = 0):
    """``config_class`` with SIZES, LOGIT_SETTINGS and OVERRIDES[key] where it has the fields, sub-configs too."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    names = {f.name for f in dataclasses.fields(config_class)}
    fields = {**(defaults or {}), **{k: v for k, v in SIZES.items() if k in names}}
    for name, spec in config_class.sub_configs_defaults.items():
        if spec.optional or depth > 1:
            continue
        sub_class = spec.config_class
        if not issubclass(sub_class, transformers.PreTrainedConfig) or sub_class is transformers.AutoConfig:
            sub_class = CONFIG_MAPPING[spec.model_type]
        fields[name] = tiny_config(sub_class, f"{key}.{name}", spec.init_kwargs, depth + 1)
    fields.update({k: v for k, v in LOGIT_SETTINGS.items() if k in names})
    return config_class(**{**fields, **OVERRIDES.get(key, {})})


def tiny_causal_lm(model_type: str, **fields):
    """The causal LM that transformers registers for ``model_type``, tiny and random (seed 0), in eval mode;
    ``fields`` are set on its (text) config before the model is built."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = tiny_config(CONFIG_MAPPING[model_type], model_type)
    for name, value in fields.items():
        setattr(config.get_text_config(), name, value)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if not isinstance(config, model_class.config_class):  # a composite config whose causal LM takes a sub-config
        config = next((getattr(config, name) for name in type(config).sub_configs_defaults
                       if isinstance(getattr(config, name), model_class.config_class)), config)
    torch.manual_seed(0)
    model = model_class(config).eval()
    if hasattr(model, "set_default_language"):  # X-MOD: one adapter per language, chosen before a forward
        model.set_default_language("en_XX")
    return model


REPO = str(Path(__file__).resolve().parents[1])


def launch_two_ranks(script: str, *args, timeout: int = 600, tests_on_path: bool = True) -> None:
    """Runs tests/``script`` (or another path) on 2 ranks under torch.distributed.run, one OpenMP thread each, on a
    free port (other test runs may be launching ranks at the same time); fails with the ranks' output tails."""
    import socket
    import subprocess
    import sys

    path = os.pathsep.join([REPO, os.path.join(REPO, "tests")] if tests_on_path else [REPO])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, os.path.join(REPO, "tests", script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
