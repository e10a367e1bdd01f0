"""``train.py`` texts for the suite: the tests' stand-in with fragments from ``trainpy/`` added.

A fragment is a small Python file. Its code is added at module level, just before the stand-in's
``if __name__ == "__main__":`` (so it may redefine ``build_model`` or patch things at import), and
if it defines ``during_training(out, data)`` the stand-in calls it while "training", with its run
folder and dataset folder. ``fingerprint`` makes every trial write the SHA-256 of the train.py it
ran to ``source.sha256`` in its run folder, so an audit can tell which commit a result came from.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from fixtures.standin.helpers import STANDIN, set_constant  # noqa: E402

FRAGMENTS = Path(__file__).with_name("trainpy")
HOOK = "    time.sleep(SLEEP_S)\n"  # the stand-in's "training" line
MAIN = 'if __name__ == "__main__":\n'
FINGERPRINT = (
    "    import hashlib\n"
    "    (out / 'source.sha256').write_text(hashlib.sha256(Path(__file__).read_bytes()).hexdigest())\n"
)


def fragment(name: str) -> str:
    """The text of ``trainpy/<name>.py``."""
    path = FRAGMENTS / f"{name}.py"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in FRAGMENTS.glob("*.py")))
        raise FileNotFoundError(f"no train.py fragment {name!r} in {FRAGMENTS}; known: {known}")
    return path.read_text()


def train_py(*fragments: str, fingerprint: bool = True, **constants: object) -> str:
    """The stand-in with ``fragments`` added and its UPPER_CASE ``constants`` set."""
    text = STANDIN.read_text()
    assert HOOK in text and MAIN in text, "the stand-in train.py changed shape; update standins.HOOK/MAIN"
    for name, value in constants.items():
        text = set_constant(text, name, value)
    hook = FINGERPRINT if fingerprint else ""
    if sum("def during_training(" in fragment(n) for n in fragments) > 1:
        raise ValueError(f"at most one of {fragments} may define during_training")
    for name in fragments:
        code = fragment(name)
        text = text.replace(MAIN, f"# --- fragment {name} ---\n{code.rstrip()}\n\n\n{MAIN}")
        if "def during_training(" in code:
            hook += "    during_training(out, data)\n"
    return text.replace(HOOK, hook + HOOK)
