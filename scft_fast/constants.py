"""Values every layer shares (data, model, ops, the CLIs, tests and benchmarks). A leaf: it imports nothing, so
the op layer reads it without reaching above itself."""

# A label that carries no loss: the LM, RTO and classification targets alike (PyTorch's and transformers' value).
IGNORE_INDEX = -100

# The classifier's pooled token: "eos" the sequence's EOS (SCFT), "pre_eos" the token before it (free at inference).
POOLS = ("eos", "pre_eos")
