"""nightlab: autonomous overnight LLM research.

Agents edit ``train.py``; the lab trains it for a fixed wall-clock budget, a trusted evaluator
measures validation bits per byte, and the loop keeps a change only when it really helped.
"""

__version__ = "0.1.0"
