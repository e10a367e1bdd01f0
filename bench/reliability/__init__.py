"""nightlab's reliability and security suite: faults, gaming attempts, bad input, secrets, sandbox.

Each script here runs on the CPU against real parts (git, SQLite, subprocesses, the trusted
evaluator) with the tests' stand-in ``train.py``; ``bench/RELIABILITY.md`` records the figures.
"""
