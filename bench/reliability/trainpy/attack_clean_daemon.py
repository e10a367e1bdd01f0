"""Class 5, survivors: start a daemon with a clean environment in a new session (no NIGHTLAB_OUT to
find it by) that waits and then rewrites the run's summary after the verdict. Under bubblewrap it
dies with the trial's PID namespace; without, the runner follows the stage's descendants: invalid."""


def during_training(out, data):
    code = ("import time; time.sleep(8); "
            f"open({str(out / 'summary.json')!r}, 'w').write('{{}}')")
    subprocess.Popen([sys.executable, "-c", code], start_new_session=True, env={}, cwd="/")
