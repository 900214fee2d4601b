"""Every default of the data layer, in one place."""
from __future__ import annotations

# DeRTa's refusal token: "Sorry" with no leading space (Llama-3 id 19701).
REFUSAL_STRING = "Sorry"

SAFE = 0
UNSAFE = 1
CLS_LABELS = {"safe": SAFE, "unsafe": UNSAFE}

# DeRTa writes this literal end-of-text string into its targets; a target ending with it (or with the
# tokenizer's own eos_token) gets the tokenizer's EOS id in its place, whatever that tokenizer is.
END_OF_TEXT = "<|end_of_text|>"
BEGIN_OF_TEXT = "<|begin_of_text|>"
PAD = "<|pad|>"

# DeRTa's prompt template, "[INST] {question} [\INST]" with a backslash, as a chat template. It renders the
# conversations of tokenizers that have no template of their own, and is the embedded tokenizer's template.
DERTA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [\\INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

PAD_TO_MULTIPLE_OF = 8
MAX_LENGTH = 1024
MIN_LENGTH = 4  # BOS, a prompt token, a target token, EOS

# The sample kinds a built dataset holds (its "kind" column).
KIND_HELPFUL = "helpful"  # triple {"instruction", "response"}: MLE, safe
KIND_REFUSAL = "refusal"  # vanilla safety sample from a harmful triple: MLE on the safe response, safe
KIND_RTO = "rto"  # harmful response trained with refusal-token transitions, unsafe
KIND_HARMFUL_PREFIX = "harmful_prefix"  # harmful prefix as context, safe response as target
KIND_MLE = "mle"  # DeRTa-format or chat record with safe="false" and nothing else known: MLE, safe
KINDS = (KIND_HELPFUL, KIND_REFUSAL, KIND_RTO, KIND_HARMFUL_PREFIX, KIND_MLE)
