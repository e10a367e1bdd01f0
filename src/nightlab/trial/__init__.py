"""One train.py run: the runner, the standby that starts the next one early, the sandbox, the bytecode cache."""
