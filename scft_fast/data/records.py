"""JSONL records -> samples (prompt text, target text, RTO flag, classification label, kind). No token ids here.

Three record formats, detected per line (field names are the README's):

    DeRTa:   {"prefix": str, "text": str, "safe": "true" | "false"}
             safe="true" means "train text with RTO" (text is a harmful response), not "text is safe".
    triples: {"instruction": str, "response": str}                                    helpful
             {"instruction": str, "harmful_response": str, "safe_response": str}      harmful question
    chat:    {"messages": [{"role": str, "content": str}, ...], "rto": bool (optional)}

Any record may carry "label": "safe" | "unsafe", which sets the classification label of every sample it makes.
Nothing else is read, so nothing else is accepted: an unknown or misspelled key (``"lable"``, ``"RTO"``), a chat
role outside CHAT_ROLES or a duplicate key is a DataError naming the field and the nearest known name.

A harmful triple becomes DeRTa's mixture (their generate_training_data.py):
    - an RTO sample: instruction -> harmful response;
    - a harmful-prefix sample: instruction + the first k words of the harmful response as context -> safe response,
      k = 0 when harmful_index % 3 == 0, else uniform in [1, n - 2] (n words, split on single spaces),
      none when n < 3. harmful_index counts the harmful triples of the whole input in order, as DeRTa's list did;
    - with vanilla_safety, a vanilla safety sample: instruction -> safe response.

Every reader takes a file's lines from jsonl_lines and each line's JSON value from decode_record: training
(build.py), evaluation and generation (read_records, a JSONL file or a JSON list as DeRTa ships some) accept and
refuse the same files with the same errors. Evaluation lays records out through record_prompt (DeRTa's question-only
records) and pair_sample (a labeled instruction / response pair, laid out as a helpful triple's sample).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from jinja2 import TemplateError

from ..errors import UserError
from .config import DataConfig
from .constants import (
    CLS_LABELS,
    DERTA_CHAT_TEMPLATE,
    END_OF_TEXT,
    KIND_HARMFUL_PREFIX,
    KIND_HELPFUL,
    KIND_MLE,
    KIND_REFUSAL,
    KIND_RTO,
    SAFE,
    UNSAFE,
)

# Stands in for the assistant's content when a conversation is rendered, to find where the target starts.
_TARGET_SENTINEL = "SCFTFASTTARGETSENTINEL"
_USER_SENTINEL = "SCFTFASTUSERSENTINEL"
# The end of DeRTa's prompt template: a DeRTa prefix ending anywhere else carries a harmful prefix.
_DERTA_PROMPT_END = "[\\INST]"

FORMAT_FIELDS = {
    "derta": ("prefix", "text", "safe"),
    "helpful": ("instruction", "response"),
    "harmful": ("instruction", "harmful_response", "safe_response"),
    "chat": ("messages",),
}
# Every key a record of each format may hold.
RECORD_KEYS = {"derta": ("prefix", "text", "safe", "label"), "helpful": ("instruction", "response", "label"),
               "harmful": ("instruction", "harmful_response", "safe_response", "label"),
               "chat": ("messages", "rto", "label")}
PROMPT_FIELDS = ("question", "instruction", "prompt")  # the user message of a prompt record; DeRTa's: "question"
MESSAGE_KEYS = ("role", "content")
CHAT_ROLES = ("system", "user", "assistant")
# A UTF-16 surrogate in a decoded string: json.loads joins an escaped pair into one character, so only a lone
# half (a "\ud800" escape without its partner) is left, which no tokenizer or UTF-8 file can hold.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_TOO_DEEP = ("nested deeper than Python's recursion limit lets JSON decode: a record is an object of strings (a chat "
             "record: an object holding a list of objects)")
_BOMS = {b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


class DataError(UserError, ValueError):
    """An invalid JSONL record: names the file, the 1-based line number and the offending field."""

    def __init__(self, source: str, line: int, field: str | None, message: str):
        self.source, self.line, self.field, self.message = source, line, field, message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: field {field!r}: {message}" if field else f"{where}: {message}")

    def __reduce__(self):  # keeps the fields across the datasets worker processes
        return DataError, (self.source, self.line, self.field, self.message)


@dataclass(frozen=True)
class Sample:
    prompt: str  # context, never carries loss
    target: str  # carries the loss; any end-of-text string already stripped, the encoder appends EOS
    rto: bool  # train the target with refusal-token transitions instead of MLE
    cls_label: int  # SAFE, UNSAFE or ignore_index
    kind: str


class ChatRenderer:
    """Renders conversations with the tokenizer's chat template (DeRTa's when it has none).

    split(messages) renders messages followed by an assistant turn and returns (prompt, lead, suffix) such that
    the rendered conversation is prompt + lead + content + suffix: lead is the whitespace the template puts
    before the content (moved to the target so that " word" stays one pre-token), suffix what it puts after.
    """

    def __init__(self, tokenizer):
        template = tokenizer.chat_template or DERTA_CHAT_TEMPLATE
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()))
        self.tokenizer, self.template = tokenizer, template
        # sorted, not set order: the datasets cache fingerprint hashes this object
        self.eos_strings = tuple(sorted({END_OF_TEXT, tokenizer.eos_token} - {None, ""}))
        probe, _, _ = self.split([{"role": "user", "content": _USER_SENTINEL}])
        self.prompt_ends = tuple(sorted({_DERTA_PROMPT_END, probe.partition(_USER_SENTINEL)[2].rstrip()} - {""}))

    def split(self, messages: list[dict]) -> tuple[str, str, str]:
        text = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": _TARGET_SENTINEL}], tokenize=False,
            chat_template=self.template)
        head, found, suffix = text.partition(_TARGET_SENTINEL)
        if not found or _TARGET_SENTINEL in suffix:
            raise ValueError(f"the chat template must render the assistant content exactly once, got {text!r}")
        prompt = head.rstrip(" ")
        return prompt, head[len(prompt):], suffix

    def strip_eos(self, target: str) -> str:
        for eos in self.eos_strings:
            if target.endswith(eos):
                return target[: -len(eos)]
        return target


def did_you_mean(name: str, known) -> str:
    """ "; did you mean 'label'?" for the closest known name (case-insensitive first), else ""."""
    known = list(known)
    match = next((k for k in known if k.lower() == name.lower()), None)
    match = match or next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.6)), None)
    return f"; did you mean {match!r}?" if match else ""


def _reject_duplicates(pairs: list) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


class _DuplicateKey(ValueError):
    pass


def _check_keys(obj: dict, known, field_prefix: str, source: str, line: int, what: str) -> None:
    for key in obj:
        if key not in known:
            raise DataError(source, line, field_prefix + key, f"unknown key in a {what}{did_you_mean(key, known)} "
                            f"(known: {', '.join(known)})")


def require_str(obj: dict, field: str, source: str, line: int, nonempty: bool) -> str:
    if field not in obj:
        raise DataError(source, line, field, "missing field")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(source, line, field, f"expected a string, got {type(value).__name__} {value!r:.80}")
    if nonempty and not value.strip():
        raise DataError(source, line, field, f"empty {'target' if field != 'instruction' else 'instruction'}")
    return value


def explicit_label(obj: dict, source: str, line: int) -> int | None:
    if "label" not in obj:
        return None
    value = obj["label"]
    if not isinstance(value, str):
        raise DataError(source, line, "label", f"expected a string, one of {sorted(CLS_LABELS)}, got "
                        f"{type(value).__name__} {value!r:.80}")
    if value not in CLS_LABELS:
        raise DataError(source, line, "label", f"unknown value {value!r}{did_you_mean(value, CLS_LABELS)} "
                        f"(expected one of {sorted(CLS_LABELS)})")
    return CLS_LABELS[value]


def _target(renderer: ChatRenderer, lead: str, text: str, suffix: str, field: str, source: str, line: int) -> str:
    content = renderer.strip_eos(text)
    if not content.strip():
        raise DataError(source, line, field, f"empty target {text!r:.80}")
    return renderer.strip_eos(lead + content + suffix)


def detect_format(obj, source: str, line: int) -> str:
    if not isinstance(obj, dict):
        raise DataError(source, line, None, f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return "chat"
    if {"prefix", "text", "safe"} & obj.keys():
        return "derta"
    if {"harmful_response", "safe_response"} & obj.keys():
        return "harmful"
    if {"instruction", "response"} & obj.keys():
        return "helpful"
    raise DataError(source, line, None, f"unknown record format with keys {sorted(obj)}; expected one of "
                    + ", ".join("{" + ", ".join(f) + "}" for f in FORMAT_FIELDS.values()))


def decode_record(raw: str, source: str, line: int):
    """One JSONL line -> its JSON value. Invalid JSON, a duplicate key, nesting deeper than Python's recursion
    limit and a lone surrogate escape in a string are DataErrors naming source, line and (where there is one) field."""
    try:
        value = json.loads(raw, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as e:
        raise DataError(source, line, e.args[0], "duplicate key (JSON keeps only the last value)") from None
    except RecursionError:
        raise DataError(source, line, None, _TOO_DEEP) from None
    except ValueError as e:
        raise DataError(source, line, None, f"invalid JSON ({e}): {raw.strip()!r:.120}") from None
    if "\\u" in raw:  # a lone surrogate can only come from an escape: UTF-8 text cannot encode one
        reject_lone_surrogates(value, source, line)
    return value


def reject_lone_surrogates(value, source: str, line: int) -> None:
    """Raises DataError naming the first string or key of a decoded JSON value that holds a lone UTF-16 surrogate.
    The nesting is walked with a stack, not recursion: any depth json.loads took is fine here."""
    stack = [("", value)]
    while stack:
        field, item = stack.pop()
        if isinstance(item, dict):
            children = [(f"{field}.{key}" if field else key, child) for key, child in item.items()]
            texts = [(name, key, "key") for (name, _), key in zip(children, item)]
        elif isinstance(item, list):
            children, texts = [(f"{field}[{i}]", child) for i, child in enumerate(item)], []
        else:
            children, texts = [], [(field, item, "string")] if isinstance(item, str) else []
        for name, text, what in texts:
            found = _LONE_SURROGATE.search(text)
            if found:
                raise DataError(source, line, name or None, f"lone UTF-16 surrogate {found.group()!r} at index "
                                f"{found.start()} of the {what} (an escape \\ud800-\\udfff without its pair is no "
                                "character): write the character itself, or both halves of its surrogate pair")
        stack += reversed(children)


def parse_record(raw: str, source: str, line: int, harmful_index: int, renderer: ChatRenderer,
                 config: DataConfig) -> list[Sample]:
    """One JSONL line -> its samples. Raises DataError on invalid input."""
    obj = decode_record(raw, source, line)
    fmt = detect_format(obj, source, line)
    _check_keys(obj, RECORD_KEYS[fmt], "", source, line, f"{fmt} record")
    label = explicit_label(obj, source, line)

    def pick(default: int) -> int:
        return default if label is None else label

    if fmt == "derta":
        prefix = require_str(obj, "prefix", source, line, nonempty=False)
        text = require_str(obj, "text", source, line, nonempty=False)
        if "safe" not in obj:
            raise DataError(source, line, "safe", "missing field")
        safe = obj["safe"]
        rto = safe if isinstance(safe, bool) else {"true": True, "false": False}.get(
            safe.lower() if isinstance(safe, str) else None)
        if rto is None:
            raise DataError(source, line, "safe", f"unknown value {safe!r}, expected \"true\" or \"false\"")
        target = _target(renderer, "", text, "", "text", source, line)
        if rto:
            return [Sample(prefix, target, True, pick(UNSAFE), KIND_RTO)]
        if prefix.rstrip().endswith(renderer.prompt_ends) or not prefix.strip():
            return [Sample(prefix, target, False, pick(SAFE), KIND_MLE)]
        return [Sample(prefix, target, False, pick(_prefix_label(config)), KIND_HARMFUL_PREFIX)]

    if fmt == "chat":
        return [_chat_sample(obj, source, line, renderer, label)]

    instruction = require_str(obj, "instruction", source, line, nonempty=True)
    if fmt == "helpful":
        response = require_str(obj, "response", source, line, nonempty=True)
        return [pair_sample(renderer, instruction, response, pick(SAFE), source, line)]

    prompt, lead, suffix = renderer.split([{"role": "user", "content": instruction}])
    harmful = require_str(obj, "harmful_response", source, line, nonempty=True)
    safe_response = require_str(obj, "safe_response", source, line, nonempty=True)
    samples = [Sample(prompt, _target(renderer, lead, harmful, suffix, "harmful_response", source, line),
                      True, pick(UNSAFE), KIND_RTO)]
    refusal = _target(renderer, lead, safe_response, suffix, "safe_response", source, line)
    k = harmful_prefix_words(harmful, harmful_index, config.seed)
    if k == 0:
        samples.append(Sample(prompt, refusal, False, pick(_prefix_label(config)), KIND_HARMFUL_PREFIX))
    elif k is not None:
        context = prompt + lead + " ".join(harmful.split(" ")[:k])
        target = _target(renderer, " ", safe_response, suffix, "safe_response", source, line)
        samples.append(Sample(context, target, False, pick(_prefix_label(config)), KIND_HARMFUL_PREFIX))
    if config.vanilla_safety:
        samples.append(Sample(prompt, refusal, False, pick(SAFE), KIND_REFUSAL))
    return samples


def pair_sample(renderer: ChatRenderer, instruction: str, response: str, label: int, source: str, line: int,
                field: str = "response") -> Sample:
    """One (instruction, response) pair as a helpful triple lays it out: the rendered user turn -> the response, with
    classification label ``label``. An empty response is a DataError naming source, line and field."""
    prompt, lead, suffix = renderer.split([{"role": "user", "content": instruction}])
    return Sample(prompt, _target(renderer, lead, response, suffix, field, source, line), False, label, KIND_HELPFUL)


def _prefix_label(config: DataConfig) -> int:
    return config.ignore_index if config.prefix_label is None else CLS_LABELS[config.prefix_label]


def harmful_prefix_words(harmful_response: str, harmful_index: int, seed: int) -> int | None:
    """k, the number of harmful words kept as context; None when the response has fewer than 3 words."""
    n = len(harmful_response.split(" "))
    if n < 3:
        return None
    if harmful_index % 3 == 0:
        return 0
    return int(np.random.default_rng([seed, harmful_index]).integers(1, n - 1))  # [1, n - 2]


def _chat_sample(obj: dict, source: str, line: int, renderer: ChatRenderer, label: int | None) -> Sample:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(source, line, "messages", f"expected a non-empty list of messages, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(source, line, f"messages[{i}]", f"expected an object, got {message!r:.80}")
        _check_keys(message, MESSAGE_KEYS, f"messages[{i}].", source, line, "chat message")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(source, line, f"messages[{i}].{key}", "missing field")
            if not isinstance(message[key], str):
                raise DataError(source, line, f"messages[{i}].{key}",
                                f"expected a string, got {type(message[key]).__name__} {message[key]!r:.80}")
        if message["role"] not in CHAT_ROLES:
            raise DataError(source, line, f"messages[{i}].role", f"unknown role {message['role']!r}"
                            f"{did_you_mean(message['role'], CHAT_ROLES)} (known: {', '.join(CHAT_ROLES)})")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(source, line, "messages", "no assistant turn to train on")
    if last < len(messages) - 1:
        raise DataError(source, line, f"messages[{last + 1}]", f"a {messages[last + 1]['role']} turn after the last "
                        f"assistant turn (messages[{last}]): the target is the last assistant turn and nothing after "
                        f"it is trained on; end the conversation with the assistant turn to train on")
    rto = obj.get("rto", False)
    if not isinstance(rto, bool):
        raise DataError(source, line, "rto", f"expected true or false, got {rto!r:.80}")
    try:
        prompt, lead, suffix = renderer.split([dict(role=m["role"], content=m["content"]) for m in messages[:last]])
    except TemplateError as e:
        raise DataError(source, line, "messages", f"the chat template rejects them: {e}") from None
    target = _target(renderer, lead, messages[last]["content"], suffix, f"messages[{last}].content", source, line)
    default = UNSAFE if rto else SAFE
    return Sample(prompt, target, rto, default if label is None else label, KIND_RTO if rto else KIND_MLE)


def scan_file(path: str) -> str:
    """The SHA-256 of a data file's bytes, after checking that it is a UTF-8 file with at least one non-blank line;
    raises DataError naming the file and line otherwise. The hash keys the datasets cache to the content."""
    if os.path.isdir(path):
        raise DataError(path, 0, None, f"is a directory: pass its JSONL files ({os.path.join(path, '*.jsonl')})")
    if not os.path.isfile(path):
        raise DataError(path, 0, None, "no such data file")
    digest, records = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            digest.update(raw)
            if number == 1 and raw[:2] in _BOMS:
                raise DataError(path, 1, None, f"the file is {_BOMS[raw[:2]]}-encoded; save it as UTF-8 (e.g. "
                                f"iconv -f UTF-16 -t UTF-8)")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, number, None, f"not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1}); save the file as UTF-8") from None
            records += bool((text.removeprefix("\ufeff") if number == 1 else text).strip())
    if not records:
        raise DataError(path, 0, None, "no records: the file is empty or holds only blank lines")
    return digest.hexdigest()


def jsonl_lines(path: str) -> Iterator[tuple[int, str]]:
    r"""(1-based line, text) of every non-blank line of a scan_file-checked UTF-8 file (a BOM skipped). Lines end at
    \n, \r\n or \r only, as Python's text files split them, never at U+2028, U+2029 or U+0085, which JSON
    allows raw inside a string (str.splitlines would cut a record there)."""
    with open(path, encoding="utf-8-sig") as f:
        for line, raw in enumerate(f, 1):
            if raw.strip():
                yield line, raw


def read_records(path: str) -> list[tuple[int, object]]:
    """(line, value) of every record of a JSONL file, or of a JSON list (DeRTa ships its JSONL files under .json;
    line: the record's 1-based index there); at least one record. The file checks and errors are training's."""
    scan_file(path)
    lines = jsonl_lines(path)
    first = next(lines)
    if not first[1].lstrip().startswith("["):
        return [(line, decode_record(raw, path, line)) for line, raw in (first, *lines)]
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        records = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as e:
        raise DataError(path, 0, e.args[0], "duplicate key in the JSON list (JSON keeps only the last value)") from None
    except RecursionError:
        raise DataError(path, 0, None, _TOO_DEEP) from None
    except ValueError as e:
        raise DataError(path, getattr(e, "lineno", 0), None, f"invalid JSON list ({e})") from None
    if not records:
        raise DataError(path, 0, None, "no records: the JSON list is empty")
    for index, record in enumerate(records, 1):
        reject_lone_surrogates(record, path, index)
    return list(enumerate(records, 1))


def record_prompt(record, source: str, line: int) -> str:
    """The user message of a prompt record: DeRTa's {"question": ...}, or {"instruction": ...} / {"prompt": ...}."""
    field = next((k for k in PROMPT_FIELDS if isinstance(record, dict) and k in record), None)
    if field is None or not isinstance(record[field], str) or not record[field].strip():
        raise DataError(source, line, None, f"expected an object with a non-empty string field among "
                        f"{PROMPT_FIELDS}, got {record!r:.120}")
    return record[field]


def read_prompts(path: str) -> list[str]:
    """The user messages of a file of prompt records (record_prompt's), in order."""
    return [record_prompt(record, path, line) for line, record in read_records(path)]
