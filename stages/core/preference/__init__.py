"""Preference batches without waste: padding-free rows that hold each prompt once, log-probs by segment.

- ``collate``: tokenized examples -> one packed row (prompt once, its replies after it, a block mask);
- ``logps``: per-sequence log-probabilities (LM head on completion tokens only) and reward scores from a row;
- ``losses``: the DPO, ORPO, KTO and reward-model pair losses on per-sequence values.
"""
