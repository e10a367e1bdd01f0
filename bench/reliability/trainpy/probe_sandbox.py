"""Probe: what can this train.py reach? Tries to read the real validation split (found through the
view's links) and to write outside its run folder (``PROBE_OUTSIDE``), then trains as usual."""


def during_training(out, data):
    real = (data / "train.tokens.npy").resolve().parent
    probes = {}
    try:
        probes["read_val"] = len((real / "val.tokens.npy").read_bytes()) > 0
    except OSError as e:
        probes["read_val"] = f"refused: {e.strerror}"
    try:
        Path(os.environ["PROBE_OUTSIDE"]).write_text("written by train.py")
        probes["write_outside"] = True
    except OSError as e:
        probes["write_outside"] = f"refused: {e.strerror}"
    probes["pid"] = os.getpid()
    (out / "probe.json").write_text(json.dumps(probes))
