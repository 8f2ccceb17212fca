"""The one base class of every error a user can fix from the command line, and the config checks
that raise them.

Each CLI prints such an error as one line on stderr and exits with status 2
(`ssr.run.cli.cli`); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class UserError(Exception):
    """Bad input (a path, a file, a setting); the message names it and says how to fix it."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (wrong type, out of range, unknown name)."""


def int_setting(value: Any, name: str, minimum: int) -> int:
    """A config integer checked where it is given (`name` is its config key), not deep in a run."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


def ints_setting(
    value: Any, name: str, count: int, minimum: int, what: str = ""
) -> tuple[int, ...]:
    """`count` config integers >= `minimum` (`what` names them in the error, e.g. "[h, w]")."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != count:
        words = {2: "two", 4: "four"}.get(count, str(count))
        bound = "positive integers" if minimum == 1 else f"integers >= {minimum}"
        raise ConfigError(f"{name}={value!r} must be {words} {bound}{what}")
    return tuple(int_setting(v, f"{name}[{i}]", minimum) for i, v in enumerate(value))


def pair_setting(value: Any, name: str) -> tuple[int, int]:
    """Two positive config integers, e.g. a (height, width) or a (long, short) scale."""
    first, second = ints_setting(value, name, 2, 1)
    return first, second
