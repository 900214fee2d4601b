"""Evaluation data: triples and DeRTa's question-only files -> labeled pairs, harmful and benign prompts, attacks.

Records are read and checked by the data layer (scft_fast/data/records.py): the file formats, a prompt's field, the
response fields and the label are the training data's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..data import SAFE, UNSAFE
from ..data.records import DataError, explicit_label, read_records, record_prompt, require_str

# DeRTa's file names say what their questions are.
DERTA_ROLES = {"safety_": "harmful", "helpfulness_": "benign"}


@dataclass
class EvalData:
    pairs: list[tuple[str, str, int]] = field(default_factory=list)  # (instruction, response, SAFE | UNSAFE)
    harmful: list[str] = field(default_factory=list)  # prompts the model should refuse
    benign: list[str] = field(default_factory=list)  # prompts it should answer
    attacks: list[tuple[str, str]] = field(default_factory=list)  # (harmful instruction, harmful response)

    def limited(self, limit: int | None) -> "EvalData":
        if limit is None:
            return self
        return EvalData(self.pairs[:limit], self.harmful[:limit], self.benign[:limit], self.attacks[:limit])

    def counts(self) -> dict:
        return {"pairs": len(self.pairs), "harmful": len(self.harmful), "benign": len(self.benign),
                "attacks": len(self.attacks)}


def derta_role(path: str) -> str | None:
    name = os.path.basename(path)
    return next((role for prefix, role in DERTA_ROLES.items() if name.startswith(prefix)), None)


def load_eval_data(data: list[str] = (), harmful: list[str] = (), benign: list[str] = ()) -> EvalData:
    """Triples and question-only files from --data (question files by DeRTa's names), question files from
    --harmful and --benign."""
    out = EvalData()
    roles = [(path, None) for path in data] + [(p, "harmful") for p in harmful] + [(p, "benign") for p in benign]
    for path, role in roles:
        for line, record in read_records(path):
            question = record_prompt(record, path, line)
            label = explicit_label(record, path, line)

            def pick(default: int) -> int:  # an explicit "label" sets every pair of the record, as in training
                return default if label is None else label

            if "harmful_response" in record or "safe_response" in record:
                harmful_response = require_str(record, "harmful_response", path, line, nonempty=True)
                safe_response = require_str(record, "safe_response", path, line, nonempty=True)
                out.pairs += [(question, harmful_response, pick(UNSAFE)), (question, safe_response, pick(SAFE))]
                out.harmful.append(question)
                out.attacks.append((question, harmful_response))
            elif "response" in record:
                out.pairs.append((question, require_str(record, "response", path, line, nonempty=True), pick(SAFE)))
                out.benign.append(question)
            else:
                file_role = role or derta_role(path)
                if file_role is None:
                    raise DataError(path, line, None, f"a question-only record, but {os.path.basename(path)!r} does "
                                    f"not say whether its questions are harmful or benign: pass the file with "
                                    f"--harmful or --benign (or name it like DeRTa's: {sorted(DERTA_ROLES)} prefixes)")
                (out.harmful if file_role == "harmful" else out.benign).append(question)
    return out
