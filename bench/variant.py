"""Write a variant of the template with some UPPER_CASE constants changed, for one benchmark run.

    python3 bench/variant.py TOTAL_BATCH_SIZE=2**18 WARMDOWN_RATIO=0.7 > /tmp/train_b18.py

Uses the same constant rewriter as the `search` agent, so comments and layout stay.
"""

import sys
from pathlib import Path

from nightlab.agents.constants import find_constants, write_constants

TEMPLATE = Path(__file__).resolve().parents[1] / "src/nightlab/template/train.py"


def main(argv: list[str]) -> int:
    source = TEMPLATE.read_text()
    known = {c.name for c in find_constants(source)}
    values = {}
    for item in argv:
        name, _, value = item.partition("=")
        if name not in known:
            print(f"variant: {name} is not a numeric constant of train.py", file=sys.stderr)
            return 2
        values[name] = eval(value, {})  # trusted command-line input, e.g. 2**18
    sys.stdout.write(write_constants(source, values))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
