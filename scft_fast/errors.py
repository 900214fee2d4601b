"""The errors a user causes and can fix: the CLIs print them as one `error:` line, never as a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input (a flag, a file, a record, the environment): the message says what is wrong and what to do.
    exit_code follows argparse: 2 for anything the user passed."""

    exit_code = 2


class RunError(UserError):
    """A run that stopped for a reason its own output explains (divergence, a full disk): exit status 1."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A setting or a config file that is unusable or contradicts the command line."""
