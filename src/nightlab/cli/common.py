"""What every subcommand shares: the one error a user can fix."""


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""
