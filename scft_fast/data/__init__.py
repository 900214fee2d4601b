"""Safety data: JSONL records (DeRTa, triples, chat) -> tokenized samples -> padded or packed batches.

    tokenizer = load_default_tokenizer()
    dataset, stats = build_dataset(default_data_files("train"), tokenizer, DataConfig(rto_keep=0.05))
    loader = DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=PaddedCollator(tokenizer.pad_token_id))

Each dataset row: input_ids, labels, transition_labels (n ints each, HF convention: unshifted), cls_pos (the pooled
position), cls_label (SAFE, UNSAFE or ignore_index), kind, length. Batch keys are model forward arguments;
check_batch refuses a batch from any collator that would train silently wrong.
"""
from ..constants import IGNORE_INDEX
from .build import DataStats, build_dataset, safety_dataset
from .checks import NoTargetWarning, check_batch
from .collate import PackedBatchSampler, PackedCollator, PaddedCollator, SCFTDataCollator
from .config import DataConfig
from .constants import DERTA_CHAT_TEMPLATE, END_OF_TEXT, KINDS, REFUSAL_STRING, SAFE, UNSAFE
from .embedded import default_data_files, load_default_tokenizer
from .encode import SampleEncoder, refusal_token_id
from .records import ChatRenderer, DataError, Sample, parse_record

__all__ = [
    "DataConfig", "DataError", "DataStats", "build_dataset", "default_data_files", "load_default_tokenizer",
    "safety_dataset", "PaddedCollator", "PackedCollator", "SCFTDataCollator", "PackedBatchSampler", "ChatRenderer", "Sample", "SampleEncoder",
    "parse_record", "refusal_token_id", "IGNORE_INDEX", "REFUSAL_STRING", "SAFE", "UNSAFE", "END_OF_TEXT",
    "DERTA_CHAT_TEMPLATE", "KINDS", "check_batch", "NoTargetWarning",
]
