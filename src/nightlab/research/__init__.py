"""The research loop: store, git, runner, policy, scheduler, agents, org, executors."""
