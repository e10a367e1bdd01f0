"""The simulated lab: a known response surface, an in-memory git and a simulated researcher."""
