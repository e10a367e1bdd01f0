"""Fault helper: build_model() takes 3 s inside the evaluator, so the evaluator can be killed mid-run."""

_standin_build_model = build_model


def build_model():
    if __name__ != "__main__":  # imported by the evaluator
        time.sleep(3.0)
    return _standin_build_model()
