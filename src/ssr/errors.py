"""The one base class of every error a user can fix from the command line.

Each CLI prints such an error as one line on stderr and exits with status 2
(`ssr.run.cli.cli`); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a path, a file, a setting); the message names it and says how to fix it."""
