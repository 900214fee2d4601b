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
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from .arguments import (
    add_debug_flag,
    cli_main,
    non_empty_str,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from .data import REFUSAL_STRING, SAFE, ChatRenderer, DataError
from .errors import ConfigError

logger = logging.getLogger(__name__)

# What a user sees in place of a blocked response; starts with the refusal string DeRTa's training targets.
REFUSAL_TEXT = f"{REFUSAL_STRING}, I can't help with that."
THRESHOLD = 0.5  # blocked when p_unsafe > THRESHOLD, unless the call or the model's SCFT config sets another
MODES = ("final", "stream")
PROMPT_FIELDS = ("question", "instruction", "prompt")  # DeRTa's test files: "question"
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
            self.p_unsafe[j] = p_unsafe_of(self.model, hidden[:, -1])


def p_unsafe_of(model, hidden: torch.Tensor) -> torch.Tensor:  # hidden: (B, H) -> (B,) float32
    """Every class but SAFE counts as unsafe."""
    return 1.0 - model.score(hidden).float().softmax(-1)[:, SAFE]


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


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] when the tokenizer itself adds one (Llama), as SampleEncoder lays out training samples."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


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
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        starts_with_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
        encoded.append(ids if starts_with_bos else bos + ids)
    return encoded


def fit_positions(prompts: list[list[int]], positions: int | None, max_new_tokens: int,
                  bos: list[int]) -> tuple[list[list[int]], list[int]]:
    """Prompts that, with max_new_tokens (+1: the EOS reading), would run past the model's positions lose their
    first tokens after BOS (the end, where the response starts, is kept), with a warning; -> prompts, dropped."""
    if positions is None:
        return prompts, [0] * len(prompts)
    room = positions - max_new_tokens - 1
    if room <= len(bos):
        raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {positions} "
                          f"positions: lower it")
    fitted, dropped = [], []
    for i, ids in enumerate(prompts):
        cut = max(0, len(ids) - room)
        if cut:
            head = len(bos) if ids[:len(bos)] == bos else 0
            ids = ids[:head] + ids[head + cut:]
            logger.warning("prompt %d: %d tokens + max_new_tokens=%d exceed the model's %d positions; its first %d "
                           "tokens were dropped", i, len(ids) + cut, max_new_tokens, positions, cut)
        fitted.append(ids)
        dropped.append(cut)
    return fitted, dropped


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids (B, P), attention_mask (B, P), padded on the left."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for r, s in enumerate(sequences):
        if s:
            ids[r, length - len(s):] = torch.tensor(s)
            mask[r, length - len(s):] = 1
    return ids.to(device), mask.to(device)


def resolve_threshold(model, threshold: float | None) -> tuple[float, str]:
    """(threshold, source): the one given, else the one stored in the model's SCFT config, else THRESHOLD."""
    if threshold is not None:
        return threshold, "argument"
    if model.scft_config.threshold is not None:
        return model.scft_config.threshold, "model config"
    return THRESHOLD, "default"


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
    SCFTForCausalLM; generate_kwargs pass through to generate() (max_new_tokens, do_sample, temperature, streamer
    for a single prompt, ...)."""
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
                                     generate_kwargs.get("max_new_tokens") or 0, bos_prefix(tokenizer))
    input_ids, prompt_mask = left_pad(encoded, pad_id, device)
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
    hook = model.get_decoder().register_forward_hook(readings)
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
    position_ids = mask.sum(1, keepdim=True) - 1  # left padding: positions count real tokens only
    model.get_decoder()(input_ids=sequences[:, -1:], attention_mask=mask, position_ids=position_ids,
                        past_key_values=cache, use_cache=True)


@torch.no_grad()
def p_unsafe_ref(model, prompt_ids: list[int], response_ids: list[int], eos_id: int, finished: bool) -> float:
    """One full forward over prompt + response (+ EOS when the response ended with it), pooled as in training
    (pre_eos reads the token before EOS; a response without EOS is read at its last token)."""
    ids = prompt_ids + response_ids + ([eos_id] if finished else [])
    hidden = model.get_decoder()(input_ids=torch.tensor([ids], device=model.device),
                                 use_cache=False).last_hidden_state
    at = len(ids) - 1 - (1 if finished and model.scft_config.pool == "pre_eos" else 0)
    return float(p_unsafe_of(model, hidden[:, at]))


def read_records(path: str) -> list[dict]:
    """A JSONL file, or a JSON list (DeRTa ships its JSONL files under .json); at least one record."""
    if os.path.isdir(path):
        raise DataError(path, 0, None, "is a directory: pass the JSONL files in it")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(path, 0, None, "no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(path, text_line(path, e.start), None, "not UTF-8 text; save the file as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except ValueError as e:
            raise DataError(path, getattr(e, "lineno", 0), None, f"invalid JSON list ({e})") from None
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as e:
                    raise DataError(path, line_no, None, f"invalid JSON ({e}): {line.strip()!r:.120}") from None
    if not records:
        raise DataError(path, 0, None, "no records: the file is empty or holds only blank lines")
    return records


def text_line(path: str, offset: int) -> int:
    """The 1-based line holding byte offset of a file."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def read_prompts(path: str) -> list[str]:
    """User messages from DeRTa's {"question": ...} records, or {"instruction": ...} / {"prompt": ...}."""
    prompts = []
    for i, record in enumerate(read_records(path), 1):
        field = next((k for k in PROMPT_FIELDS if isinstance(record, dict) and k in record), None)
        if field is None or not isinstance(record[field], str):
            raise DataError(path, i, None, f"expected an object with a string field among {PROMPT_FIELDS}, got "
                            f"{record!r:.120}")
        prompts.append(record[field])
    return prompts


def load_model(path: str, device: str | None = None, dtype: str = "auto", init_head: bool = False):
    """An SCFTForCausalLM directory as `scft-fast train` writes it, and the tokenizer beside it, in eval mode.
    init_head: a checkpoint without a head (a model before SCFT) gets a freshly initialized one."""
    from transformers import AutoTokenizer

    from .model import SCFTForCausalLM

    check_model_dir(path)
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    model = SCFTForCausalLM.from_pretrained(path, init_head=init_head, dtype=torch_dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def check_model_dir(path: str, flag: str = "--model") -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        what = "does not exist" if not os.path.exists(path) else "has no config.json"
        raise ConfigError(f"{flag} {path} {what}: expected a model directory, such as the one `scft-fast train` "
                          f"writes under its output directory (OUTPUT_DIR/model)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scft-fast generate",
        description="Generate responses with the SCFT head as a safety gate: a response whose p_unsafe exceeds the "
                    "threshold is replaced by the refusal text. Prints each response with its verdict.")
    parser.add_argument("--model", required=True, help="model directory written by `scft-fast train` (model, head "
                        "and tokenizer together)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a user message; repeat for several")
    source.add_argument("--prompts", metavar="FILE", help="JSONL of prompts: DeRTa's {\"question\": ...}, or "
                        "{\"instruction\": ...} / {\"prompt\": ...}")
    parser.add_argument("--threshold", type=probability, default=None,
                        help="block when p_unsafe > threshold, in [0, 1] (default: the threshold stored in the "
                        "model's SCFT config by `scft-fast eval --store-threshold`, else "
                        f"{THRESHOLD}); the one used is printed")
    parser.add_argument("--mode", choices=MODES, default="final", help="final: judge the finished response; "
                        "stream: also judge every --check-every tokens and stop at the first unsafe reading")
    parser.add_argument("--check-every", type=positive_int, default=1,
                        help="stream mode: tokens between readings (default 1)")
    parser.add_argument("--refusal-text", type=non_empty_str, default=REFUSAL_TEXT,
                        help=f"shown instead of a blocked response (default {REFUSAL_TEXT!r})")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128,
                        help="generate()'s max_new_tokens (default 128); a prompt that would run past the model's "
                        "positions loses its first tokens, with a warning, and is marked in the output")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=positive_float, default=None, help="sampling temperature")
    parser.add_argument("--top-p", type=probability, default=None, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=positive_int, default=None, help="top-k sampling")
    parser.add_argument("--repetition-penalty", type=positive_float, default=None,
                        help="generate()'s repetition_penalty")
    parser.add_argument("--generate-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="any other generate() argument, VALUE read as JSON when it parses (e.g. "
                        "min_new_tokens=8, no_repeat_ngram_size=3); repeat for several; overrides the flags above")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="torch seed for sampling (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts per generate() batch (default 8)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="weights dtype (default: as saved)")
    parser.add_argument("--live", action="store_true", help="print the single prompt's response as it is generated; "
                        "only tokens a reading has judged safe are printed (every --check-every tokens with "
                        "--mode stream, at the end with --mode final)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per response instead of text")
    add_debug_flag(parser)
    return parser


def parse_generate_arg(arg: str) -> tuple[str, object]:
    key, sep, value = arg.partition("=")
    if not sep or not key.isidentifier():
        raise ConfigError(f"--generate-arg expects KEY=VALUE with KEY a generate() argument name, got {arg!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


@cli_main("scft-fast generate")
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt and not all(p.strip() for p in args.prompt):
        parser.error("argument --prompt: expected a non-empty message")
    generate_args = [parse_generate_arg(arg) for arg in args.generate_arg]
    prompts = args.prompt if args.prompt else read_prompts(args.prompts)
    if args.live and len(prompts) != 1:
        parser.error(f"argument --live: prints a single response; got {len(prompts)} prompts")
    check_model_dir(args.model)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    if not args.json:
        print("threshold {:.4f} ({})".format(*resolve_threshold(model, args.threshold)))
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                "repetition_penalty": args.repetition_penalty}
    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                           **{k: v for k, v in sampling.items() if v is not None})
    generate_kwargs.update(generate_args)  # the last word on any argument
    if args.live:
        generate_kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start: start + args.batch_size]
        results = generate_safe(model, tokenizer, chunk, threshold=args.threshold, mode=args.mode,
                                check_every=args.check_every, refusal_text=args.refusal_text, **generate_kwargs)
        for i, (prompt, result) in enumerate(zip(chunk, results), start):
            if args.json:
                print(json.dumps({"prompt": prompt, **asdict(result)}))
                continue
            verdict = (f"BLOCKED at token {result.blocked_at_token}" if result.blocked else "allowed")
            if result.truncated_prompt_tokens:
                verdict += f" (PROMPT TRUNCATED: its first {result.truncated_prompt_tokens} tokens dropped)"
            print(f"[{i}] {prompt}\n  -> {result.text}\n  {verdict}, p_unsafe={result.p_unsafe:.4f}"
                  + (f"\n  raw: {result.raw_text}" if result.blocked else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
