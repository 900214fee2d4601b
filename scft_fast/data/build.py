"""build_dataset: JSONL files -> a tokenized datasets.Dataset and its DataStats.

Two passes, both on disk through the datasets library (nothing holds the corpus as Python objects):
    1. Dataset.from_generator reads the raw lines (one row per non-blank line: file, line number, text) and numbers
       the harmful triples, which DeRTa's k = 0 rule needs in input order;
    2. a batched map (num_proc workers, cached) parses, validates, expands triples and tokenizes.
Rows of the result: input_ids, labels, transition_labels (lists of n ints), cls_pos, cls_label, kind, length (n).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

from .config import DataConfig
from .constants import SAFE, UNSAFE
from .encode import (
    STATUS_DROPPED,
    STATUS_INVALID,
    STATUS_OK,
    STATUS_TRUNCATED_PROMPT,
    STATUS_TRUNCATED_TARGET,
    SampleEncoder,
)
from .records import ChatRenderer, DataError, decode_record, detect_format, jsonl_lines, parse_record, scan_file

logger = logging.getLogger(__name__)

COLUMNS = ("input_ids", "labels", "transition_labels", "cls_pos", "cls_label", "kind", "length")
_MAX_REPORTED_ERRORS = 5
_EMPTY_ROW = {"input_ids": [], "labels": [], "transition_labels": [], "cls_pos": -1, "cls_label": 0, "kind": "",
              "length": 0, "status": "", "error": ""}


@dataclass
class DataStats:
    records: int = 0
    invalid: int = 0
    dropped: int = 0  # over max_length with truncation="drop"
    truncated_prompt: int = 0
    truncated_target: int = 0
    samples: int = 0
    samples_per_kind: dict = field(default_factory=dict)
    tokens: int = 0
    lm_tokens: int = 0  # positions with an LM label
    rto_positions: int = 0  # positions with a transition label
    cls_safe: int = 0
    cls_unsafe: int = 0
    cls_unlabeled: int = 0
    max_sample_length: int = 0
    errors: list = field(default_factory=list)  # the first few invalid-record messages

    @property
    def loss_share(self) -> float:
        return (self.lm_tokens + self.rto_positions) / max(self.tokens, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "loss_share": self.loss_share}

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.samples_per_kind.items()))
        lines = [
            f"{self.records} records -> {self.samples} samples ({kinds})",
            f"tokens {self.tokens} (longest {self.max_sample_length}), loss-bearing {self.loss_share:.1%}: "
            f"LM {self.lm_tokens}, RTO {self.rto_positions}",
            f"classification labels: safe {self.cls_safe}, unsafe {self.cls_unsafe}, none {self.cls_unlabeled}",
            f"invalid records skipped {self.invalid}, over max_length: dropped {self.dropped}, "
            f"prompt truncated {self.truncated_prompt}, target truncated {self.truncated_target}",
        ]
        lines += [f"  {e}" for e in self.errors]
        return "\n".join(lines)


def _read_lines(files: list[str], signatures: list):
    """One row per non-blank line. signatures (content hashes) only key the datasets cache to the files."""
    del signatures
    record = harmful = 0
    for path in files:
        for line, raw in jsonl_lines(path):
            harmful_index = -1
            try:
                is_harmful = detect_format(decode_record(raw, path, line), path, line) == "harmful"
            except DataError:  # reported by the map, with its field
                is_harmful = False
            if is_harmful:
                harmful_index, harmful = harmful, harmful + 1
            yield {"source": path, "line": line, "raw": raw, "record": record, "harmful_index": harmful_index}
            record += 1


class _Expander:
    """The map function: a batch of raw lines -> a batch of encoded samples (0 to 3 per line)."""

    def __init__(self, tokenizer, config: DataConfig):
        self.config = config
        self.renderer = ChatRenderer(tokenizer)
        self.encoder = SampleEncoder(tokenizer, config)

    def __call__(self, batch: dict) -> dict:
        cfg = self.config
        samples, seeds, rows = [], [], []
        for source, line, raw, record, harmful_index in zip(
                batch["source"], batch["line"], batch["raw"], batch["record"], batch["harmful_index"]):
            try:
                parsed = parse_record(raw, source, line, harmful_index, self.renderer, cfg)
            except DataError as e:
                if not cfg.skip_invalid:
                    raise
                rows.append({**_EMPTY_ROW, "cls_label": cfg.ignore_index, "status": STATUS_INVALID, "error": str(e)})
                continue
            samples += parsed
            seeds += [(cfg.seed, record, slot) for slot in range(len(parsed))]
        for sample, enc in zip(samples, self.encoder.encode(samples, seeds)):
            rows.append({**_EMPTY_ROW, **enc, "length": len(enc.get("input_ids", ())), "cls_label": sample.cls_label,
                         "kind": sample.kind})
        return {c: [row[c] for row in rows] for c in _EMPTY_ROW}


def _value_counts(column) -> dict:
    import pyarrow.compute as pc

    if len(column) == 0:
        return {}
    values, counts = pc.value_counts(column).flatten()
    return {v: int(c) for v, c in zip(values.to_pylist(), counts.to_pylist())}


def build_dataset(files, tokenizer, config: DataConfig | None = None):
    """JSONL files (any mix of the three formats) -> (datasets.Dataset, DataStats). Raises DataError on a bad
    record unless config.skip_invalid."""
    import datasets
    import pyarrow.compute as pc

    config = config or DataConfig()
    files = [os.fspath(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
    signatures = [scan_file(p) for p in files]
    features = datasets.Features({"source": datasets.Value("string"), "line": datasets.Value("int64"),
                                  "raw": datasets.Value("string"), "record": datasets.Value("int64"),
                                  "harmful_index": datasets.Value("int64")})
    raw = datasets.Dataset.from_generator(_read_lines, features=features, cache_dir=config.cache_dir,
                                          gen_kwargs={"files": files, "signatures": signatures})
    token_list = datasets.Sequence(datasets.Value("int32"))  # datasets < 4 has no datasets.List
    out_features = datasets.Features({
        "input_ids": token_list, "labels": token_list, "transition_labels": token_list,
        "cls_pos": datasets.Value("int32"),
        "cls_label": datasets.Value("int32"), "kind": datasets.Value("string"), "length": datasets.Value("int32"),
        "status": datasets.Value("string"), "error": datasets.Value("string")})
    encoded = raw.map(_Expander(tokenizer, config), batched=True, batch_size=512, remove_columns=raw.column_names,
                      features=out_features, num_proc=config.num_proc if config.num_proc > 1 else None,
                      desc="Tokenizing safety data")

    status = _value_counts(encoded.data.column("status"))
    errors = []
    if status.get(STATUS_INVALID):
        invalid = encoded.filter(lambda s: s == STATUS_INVALID, input_columns="status")
        errors = list(invalid.select(range(min(_MAX_REPORTED_ERRORS, len(invalid))))["error"])
    kept_status = (STATUS_OK, STATUS_TRUNCATED_PROMPT, STATUS_TRUNCATED_TARGET)
    if sum(status.get(s, 0) for s in kept_status) != len(encoded):
        # flatten_indices: the filtered rows become a table of their own, which the statistics below read
        encoded = encoded.filter(lambda s: [x in kept_status for x in s], input_columns="status",
                                 batched=True).flatten_indices()
    dataset = encoded.select_columns(list(COLUMNS))

    stats = DataStats(records=len(raw), invalid=status.get(STATUS_INVALID, 0), dropped=status.get(STATUS_DROPPED, 0),
                      truncated_prompt=status.get(STATUS_TRUNCATED_PROMPT, 0),
                      truncated_target=status.get(STATUS_TRUNCATED_TARGET, 0), samples=len(dataset), errors=errors)
    if len(dataset):
        t = dataset.data
        ignore = config.ignore_index
        stats.samples_per_kind = _value_counts(t.column("kind"))
        stats.tokens = int(pc.sum(t.column("length")).as_py())
        stats.max_sample_length = int(pc.max(t.column("length")).as_py())
        stats.lm_tokens = int(pc.sum(pc.not_equal(pc.list_flatten(t.column("labels")), ignore)).as_py() or 0)
        stats.rto_positions = int(pc.sum(pc.not_equal(pc.list_flatten(t.column("transition_labels")), ignore))
                                  .as_py() or 0)
        labels = t.column("cls_label")
        stats.cls_safe = int(pc.sum(pc.equal(labels, SAFE)).as_py() or 0)
        stats.cls_unsafe = int(pc.sum(pc.equal(labels, UNSAFE)).as_py() or 0)
        stats.cls_unlabeled = stats.samples - stats.cls_safe - stats.cls_unsafe
    if stats.invalid or stats.dropped or stats.truncated_prompt or stats.truncated_target:
        logger.warning("safety data from %s:\n%s", files, stats.summary())
    else:
        logger.info("safety data from %s:\n%s", files, stats.summary())
    return dataset, stats


def safety_dataset(tokenizer, files=None, *, split: str = "train", config: DataConfig | None = None,
                   **config_fields):
    """The tokenized dataset ``SCFTTrainer`` and ``SCFTDataCollator`` take: ``build_dataset`` of JSONL ``files``
    or, when ``files`` is None, of the embedded dataset's ``split`` ("train" | "eval"). DataConfig fields may be
    passed as keywords (``rto_keep=0.05``) instead of ``config``."""
    from .embedded import default_data_files

    if config is not None and config_fields:
        raise ValueError(f"pass either config or DataConfig fields, not both (got {sorted(config_fields)})")
    config = config or DataConfig(**config_fields)
    dataset, _ = build_dataset(default_data_files(split) if files is None else files, tokenizer, config)
    return dataset
