"""The night: lab state, proposals, trials, verdicts, recovery, the scheduler, the store, history and notes."""
