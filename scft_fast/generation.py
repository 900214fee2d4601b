"""Safety-gated generation: SCFT's head judges each response from hidden states generate() computes anyway.

    results = generate_safe(model, tokenizer, ["How do I bake bread?"], max_new_tokens=64)
    results[0].text, results[0].p_unsafe, results[0].blocked

Where the verdict comes from. B prompts, left-padded to P positions, n generated tokens y_1 .. y_n:
generate() calls the decoder n times (the prompt, then y_1 .. y_{n-1}; y_n is never fed back). A forward hook on
the decoder applies the head to the last position of each call, so reading j (j = 0: the prompt's end, j >= 1:
token y_j) judges the response y_1 .. y_j, at the cost of a (B, H) x (H, C) product per step.
    pool="pre_eos": the head reads the last response token y_L of "y_1 .. y_L EOS": already fed, zero extra cost.
    pool="eos":     the head reads EOS itself. A row that finished early had its EOS fed at the next step; the rows
                    that finish at the last step never do: one extra single-token decoder step on the returned KV
                    cache (the LM head is not applied).
    A response cut by max_new_tokens has no EOS and is read at its last token y_n, which also takes that one step
    (under any pool).
mode="stream" also judges y_1 .. y_j every check_every tokens during generate() (a StoppingCriteria, per row) and
stops a row at the first reading with p_unsafe > threshold, so an unsafe response is never finished. These running
readings are taken at the latest token: exactly the trained reading for pool="pre_eos", an approximation of the
EOS reading for pool="eos". A streamer only ever receives tokens that a reading has already found safe.

p_unsafe and the default THRESHOLD are scft_fast.metrics'; prompts follow the data layer's BOS, truncation and
padding rules (data/encode.py, data/collate.py). `scft-fast generate` is scft_fast/cli/generate.py.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .data import REFUSAL_STRING, ChatRenderer
from .data.collate import pad_sequences, positions_from_mask
from .data.encode import bos_prefix, keep_prompt_end, prompt_bos
from .errors import ConfigError
from .metrics import THRESHOLD, p_unsafe

logger = logging.getLogger(__name__)

# What a user sees in place of a blocked response; starts with the refusal string DeRTa's training targets.
REFUSAL_TEXT = f"{REFUSAL_STRING}, I can't help with that."
MODES = ("final", "stream")
# generate() settings the readings rely on: one row per prompt, one decoder call per token on the KV cache.
REQUIRED_GENERATE_SETTINGS = {"num_beams": 1, "num_return_sequences": 1, "assistant_model": None,
                               "prompt_lookup_num_tokens": None, "use_cache": True}


@dataclass
class SafeGeneration:
    text: str  # shown to the user: the response, or refusal_text when blocked
    raw_text: str  # what the model generated (special tokens dropped), whatever the verdict
    p_unsafe: float  # the head's verdict: at the blocking reading when blocked, else on the whole response
    blocked: bool  # p_unsafe > threshold
    blocked_at_token: int | None  # j of the blocking reading (it judged y_1 .. y_j; L + 1: the EOS); None: allowed
    response_ids: list[int]  # generated token ids, EOS and padding excluded
    finished: bool  # the model ended the response with EOS
    threshold: float  # the verdict's threshold
    threshold_source: str  # where it came from: "argument", "model config" (scft-fast eval --store-threshold), "default"
    truncated_prompt_tokens: int = 0  # > 0: the prompt's first tokens were dropped to fit the model's positions


class HeadReadings:
    """Forward hook on the decoder: p_unsafe at the last position of each call, keyed by response position j."""

    def __init__(self, model, prompt_length: int):
        self.model, self.prompt_length = model, prompt_length
        self.fed = 0  # positions fed so far (the KV cache length)
        self.p_unsafe: dict[int, torch.Tensor] = {}  # j -> (B,) float32

    def __call__(self, module, args, output):
        hidden = output[0]  # (B, t, H) final normed hidden states, the LM head's input
        self.fed += hidden.shape[1]
        j = self.fed - self.prompt_length
        if j >= 0:
            self.p_unsafe[j] = p_unsafe(self.model.score(hidden[:, -1]))


class StreamGate(StoppingCriteria):
    """mode="stream": stops a row at the first reading j (every check_every tokens) with p_unsafe > threshold."""

    def __init__(self, readings: HeadReadings, threshold: float, check_every: int, eos_ids: torch.Tensor,
                 batch: int, device, streamer=None):
        self.readings, self.threshold, self.check_every = readings, threshold, check_every
        self.eos_ids, self.streamer = eos_ids, streamer
        self.active = torch.ones(batch, dtype=torch.bool, device=device)  # neither ended nor blocked
        self.blocked_at = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.blocked_p = torch.zeros(batch, device=device)
        self.released = 0  # response tokens handed to the streamer

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # (B, P + j + 1) -> (B,)
        j = input_ids.shape[1] - self.readings.prompt_length - 1  # y_1 .. y_j judged, y_{j+1} not yet
        unsafe = torch.zeros_like(self.active)
        if j >= 1 and j % self.check_every == 0:
            p = self.readings.p_unsafe[j]
            unsafe = self.active & (p > self.threshold)
            self.blocked_at = torch.where(unsafe, j, self.blocked_at)
            self.blocked_p = torch.where(unsafe, p, self.blocked_p)
            if self.streamer is not None and not bool(unsafe[0]) and bool(self.active[0]):
                start = self.readings.prompt_length
                self.streamer.put(input_ids[0, start + self.released: start + j].cpu())
                self.released = j
        self.active &= ~unsafe & ~torch.isin(input_ids[:, -1], self.eos_ids)
        return unsafe


def encode_prompts(tokenizer, prompts: list, response_prefixes: list[str] | None = None) -> list[list[int]]:
    """Prompt token ids laid out as in training: BOS (when the tokenizer adds one), the rendered user turn, and,
    when given, the forced beginning of the response (DeRTa's completion attack), tokenized with the prompt as
    the data layer tokenizes a harmful-prefix context. A prompt is a user message or a list of chat messages."""
    renderer = ChatRenderer(tokenizer)
    bos = bos_prefix(tokenizer)
    if response_prefixes is not None and len(response_prefixes) != len(prompts):
        raise ValueError(f"response_prefixes must hold one prefix per prompt: got {len(response_prefixes)} for "
                         f"{len(prompts)} prompts")
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            messages = prompt
        else:
            raise TypeError(f"prompt {i} must be a string or a list of chat messages, got {type(prompt).__name__}")
        text, lead, _ = renderer.split(messages)
        prefix = response_prefixes[i] if response_prefixes is not None else ""
        if prefix:
            text = text + lead + prefix
        encoded.append(prompt_bos(tokenizer, text, bos) + tokenizer(text, add_special_tokens=False)["input_ids"])
    return encoded


def fit_positions(prompts: list[list[int]], positions: int | None, max_new_tokens: int,
                  bos_id: int | None) -> tuple[list[list[int]], list[int]]:
    """Prompts that, with max_new_tokens (+1: the EOS reading), would run past the model's positions lose their
    first tokens after BOS (the end, where the response starts, is kept), with a warning; -> prompts, dropped."""
    if positions is None:
        return prompts, [0] * len(prompts)
    room = positions - max_new_tokens - 1
    if room <= (bos_id is not None):
        raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {positions} "
                          f"positions: lower it")
    fitted, dropped = [], []
    for i, ids in enumerate(prompts):
        kept = keep_prompt_end(ids, room, bos_id)
        cut = len(ids) - len(kept)
        if cut:
            logger.warning("prompt %d: %d tokens + max_new_tokens=%d exceed the model's %d positions; its first %d "
                           "tokens were dropped", i, len(ids), max_new_tokens, positions, cut)
        fitted.append(kept)
        dropped.append(cut)
    return fitted, dropped


def resolve_threshold(model, threshold: float | None) -> tuple[float, str]:
    """(threshold, source): the one given, else the one stored in the model's SCFT config, else THRESHOLD."""
    if threshold is not None:
        return threshold, "argument"
    if model.scft_config.threshold is not None:
        return model.scft_config.threshold, "model config"
    return THRESHOLD, "default"


def store_threshold(model_dir: str, threshold: float) -> str:
    """Writes threshold into model_dir/config.json's SCFT settings (atomically), where resolve_threshold finds it
    once the model is loaded again; -> the file's path."""
    from .hf.config import SCFT_CONFIG_KEY, SCFTConfig

    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    scft = SCFTConfig.from_dict({**config.get(SCFT_CONFIG_KEY, {}), "threshold": threshold})
    config[SCFT_CONFIG_KEY] = asdict(scft)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _check_arguments(prompts, threshold: float, mode: str, check_every: int, generate_kwargs: dict) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list, got {prompts!r:.80}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int, got {check_every!r}")
    for name, supported in REQUIRED_GENERATE_SETTINGS.items():
        value = generate_kwargs.get(name, supported)
        if value != supported:
            raise ValueError(f"generate_safe needs one row per prompt and the KV cache: {name}={value!r} is not "
                             f"supported (expected {supported!r})")


@torch.no_grad()
def generate_safe(model, tokenizer, prompts: list, *, threshold: float | None = None, mode: str = "final",
                  check_every: int = 1, refusal_text: str = REFUSAL_TEXT,
                  response_prefixes: list[str] | None = None, **generate_kwargs) -> list[SafeGeneration]:
    """Generates a response per prompt (one left-padded batch, KV cache, greedy or sampled as generate_kwargs say)
    and withholds those the head finds unsafe: blocked exactly when p_unsafe > threshold (None: the threshold stored
    in the model's SCFT config, else THRESHOLD; each result names the one used). ``model`` is an
    SCFTForCausalLM (PEFT-wrapped or not); generate_kwargs pass through to generate() (max_new_tokens, do_sample,
    temperature, streamer for a single prompt, ...)."""
    from .hf.peft import scft_base

    model = scft_base(model, "generate_safe")
    threshold, threshold_source = resolve_threshold(model, threshold)
    _check_arguments(prompts, threshold, mode, check_every, generate_kwargs)
    streamer = generate_kwargs.pop("streamer", None)
    if streamer is not None and len(prompts) != 1:
        raise ValueError(f"a streamer takes a single prompt, got {len(prompts)}")
    eos = generate_kwargs.pop("eos_token_id", tokenizer.eos_token_id)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token and no eos_token_id was given: responses could not end")
    eos_list = [eos] if isinstance(eos, int) else list(eos)
    pad_id = generate_kwargs.pop("pad_token_id", tokenizer.pad_token_id)
    pad_id = eos_list[0] if pad_id is None else pad_id
    device = model.device
    encoded, dropped = fit_positions(encode_prompts(tokenizer, list(prompts), response_prefixes),
                                     getattr(model.config, "max_position_embeddings", None),
                                     generate_kwargs.get("max_new_tokens") or 0, tokenizer.bos_token_id)
    input_ids, prompt_mask = (t.to(device) for t in pad_sequences(encoded, pad_id, "left"))
    batch, prompt_length = input_ids.shape
    eos_ids = torch.tensor(eos_list, device=device)

    readings = HeadReadings(model, prompt_length)
    criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
    gate = None
    if mode == "stream":
        gate = StreamGate(readings, threshold, check_every, eos_ids, batch, device, streamer)
        criteria.append(gate)
    if streamer is not None:
        streamer.put(input_ids[0].cpu())
    hook = model.lm_decoder().register_forward_hook(readings)
    try:
        out = model.generate(input_ids=input_ids, attention_mask=prompt_mask, eos_token_id=eos_list,
                             pad_token_id=pad_id, stopping_criteria=criteria, return_dict_in_generate=True,
                             **generate_kwargs)
        generated = out.sequences[:, prompt_length:]  # (B, n)
        n = generated.shape[1]
        blocked_at = gate.blocked_at.tolist() if gate is not None else [-1] * batch
        is_eos = torch.isin(generated, eos_ids)
        ended = is_eos.any(1).tolist()
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), n).tolist()
        lengths, reading_at = [], []
        for r in range(batch):
            length = min(first_eos[r], blocked_at[r] + 1) if blocked_at[r] >= 0 else first_eos[r]
            lengths.append(length)
            if blocked_at[r] >= 0:
                reading_at.append(blocked_at[r])
            else:
                reading_at.append(length + 1 if ended[r] and model.scft_config.pool == "eos" else length)
        if n not in readings.p_unsafe and n in reading_at:
            _feed_last_token(model, out.sequences, out.past_key_values, prompt_mask)
    finally:
        hook.remove()

    results = []
    for r in range(batch):
        ids = generated[r, : lengths[r]].tolist()
        raw = tokenizer.decode(ids, skip_special_tokens=True).strip()
        p = float(gate.blocked_p[r]) if blocked_at[r] >= 0 else float(readings.p_unsafe[reading_at[r]][r])
        blocked = p > threshold
        results.append(SafeGeneration(
            text=refusal_text if blocked else raw, raw_text=raw, p_unsafe=p, blocked=blocked,
            blocked_at_token=reading_at[r] if blocked else None, response_ids=ids,
            finished=bool(ended[r]) and first_eos[r] == lengths[r], threshold=threshold,
            threshold_source=threshold_source, truncated_prompt_tokens=dropped[r]))
    if streamer is not None:
        if not results[0].blocked:
            released = gate.released if gate is not None else 0
            rest = results[0].response_ids[released:]
            if rest:
                streamer.put(torch.tensor(rest, dtype=torch.long))
        streamer.end()
    return results


def _feed_last_token(model, sequences: torch.Tensor,  # (B, P + n)
                     cache, prompt_mask: torch.Tensor) -> None:  # prompt_mask: (B, P)
    """The one extra single-token decoder step: feeds y_n (EOS, or the last token of a cut response) on the KV
    cache so that the readings hook sees its hidden state. The LM head is not applied."""
    n = sequences.shape[1] - prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], n)], dim=1)
    model.lm_decoder()(input_ids=sequences[:, -1:], attention_mask=mask,
                        position_ids=positions_from_mask(mask)[:, -1:], past_key_values=cache, use_cache=True)


@torch.no_grad()
def p_unsafe_ref(model, prompt_ids: list[int], response_ids: list[int], eos_id: int, finished: bool) -> float:
    """One full forward over prompt + response (+ EOS when the response ended with it), pooled as in training
    (pre_eos reads the token before EOS; a response without EOS is read at its last token)."""
    ids = prompt_ids + response_ids + ([eos_id] if finished else [])
    hidden = model.final_hidden_states(input_ids=torch.tensor([ids], device=model.device))
    at = len(ids) - 1 - (1 if finished and model.scft_config.pool == "pre_eos" else 0)
    return float(p_unsafe(model.score(hidden[:, at])))


def load_model(path: str, device: str | None = None, dtype: str = "auto", init_head: bool = False):
    """An SCFTForCausalLM directory as `scft-fast train` writes it, and the tokenizer beside it, in eval mode.
    init_head: a checkpoint without a head (a model before SCFT) gets a freshly initialized one."""
    from transformers import AutoTokenizer

    from .hf.patch import SCFTForCausalLM

    check_model_dir(path)
    if not init_head and not os.path.isfile(os.path.join(path, "adapter_config.json")):
        from .hf.loading import has_head

        if not has_head(path):
            raise ConfigError(f"--model {path} holds no SCFT head (score.weight is not in its weights): the model "
                              f"`scft-fast train` writes (OUTPUT_DIR/model) has one; a model before SCFT has nothing "
                              f"to judge its responses with")
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    model = SCFTForCausalLM.from_pretrained(path, init_head=init_head, dtype=torch_dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_dir(path: str, flag: str = "--model") -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        what = "does not exist" if not os.path.exists(path) else "has no config.json"
        raise ConfigError(f"{flag} {path} {what}: expected a model directory, such as the one `scft-fast train` "
                          f"writes under its output directory (OUTPUT_DIR/model)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ConfigError(f"{flag} {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): the model directory "
                          f"`scft-fast train` writes holds its tokenizer; save one there with "
                          f"tokenizer.save_pretrained({path!r})")
