"""Gaming: start a process in a new session, so it outlives the trial's process group; its command
line names the run folder, so the suite can find it afterwards."""


def during_training(out, data):
    code = "import sys, time; time.sleep(120)"
    pid = subprocess.Popen([sys.executable, "-c", code, f"survivor-of:{out}"], start_new_session=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    (out / "survivor.pid").write_text(str(pid))
