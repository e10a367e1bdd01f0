"""Proposers: whatever edits train.py for the next experiment. See ``base.Proposer``."""
