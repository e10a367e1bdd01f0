"""Gaming: start a process in a new session, so it outlives the trial's process group, and record its pid."""


def during_training(out, data):
    code = "import os, time; time.sleep(120)"
    pid = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    (out / "survivor.pid").write_text(str(pid))
