"""Variant: state left for the next trial, from the judge's model process: write a file into the
home folder and /tmp that a later train.py could read (say, the val windows it was shown). Under
bubblewrap the model process has a private /tmp and a read-only root; without it, the model
process's home is its own temporary folder, deleted after the evaluation."""

if __name__ != "__main__" and "NIGHTLAB_OUT" not in os.environ:
    for _place in (Path.home(), Path("/tmp")):
        try:
            (_place / "nightlab_left_for_next.txt").write_text("val windows seen: ...")
        except OSError:
            pass
