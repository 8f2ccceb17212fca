"""The command-line convention of every ssr CLI: a user error is one line on stderr and exit 2.

A user error is any `ssr.errors.UserError` (a bad path, file or setting), also when Hydra wraps it
in an `InstantiationException` because a config node's constructor raised it or a DataLoader
worker re-raises it with the worker's traceback, and a missing mandatory config value (`???`).
Ctrl-C is one line and exit 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

from hydra.errors import InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from ssr.errors import ConfigError, UserError
from ssr.run.console import quiet_third_party

if TYPE_CHECKING:
    import torch

F = TypeVar("F", bound=Callable[..., Any])


class Interrupted(BaseException):
    """Ctrl-C, raised instead of KeyboardInterrupt: Lightning turns a KeyboardInterrupt into
    exit status 1 (read as a crash), and no `except Exception` swallows this one."""


def raise_interrupted(signum: int, frame: Any) -> None:
    """SIGINT handler of every CLI (`cli`)."""
    raise Interrupted


def user_error(err: BaseException) -> str | None:
    """The one-line message of a user error (unwrapping Hydra's wrappers), else None."""
    cause: BaseException | None = err
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, UserError):
        return _own_message(str(cause))
    if isinstance(cause, MissingMandatoryValue):
        return f"{cause.full_key} is required: pass {cause.full_key}=..."
    return None


def _own_message(message: str) -> str:
    """A DataLoader worker's error arrives as "Caught X in DataLoader worker process N. Original
    Traceback ...": keep the error's own last line, without the `module.Class: ` prefix."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    name, sep, text = last.partition(": ")
    return text if sep and "Error" in name else last


def cli(fn: F) -> F:
    """Wrap a CLI body: quiet third-party noise, apply a Hydra config's `float32_matmul_precision`,
    report user errors in one line (exit code 2)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_third_party()
        previous = None
        if threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # started with `&` or nohup
        ):
            previous = signal.signal(signal.SIGINT, raise_interrupted)
        try:
            if args and isinstance(args[0], DictConfig) and "float32_matmul_precision" in args[0]:
                set_matmul_precision(args[0].float32_matmul_precision)
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, Interrupted):
            print("error: interrupted (Ctrl-C); finished outputs are kept", file=sys.stderr)
            sys.exit(130)
        except Exception as err:
            message = user_error(err)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    return wrapper  # type: ignore[return-value]


MATMUL_PRECISIONS = ("highest", "high", "medium")


def set_matmul_precision(value: Any) -> None:
    """TF32 for fp32 matmuls on Ampere+ as in training (`high`), so eval reproduces the test
    metric; `highest` is true fp32."""
    if value not in MATMUL_PRECISIONS:
        raise ConfigError(
            f"float32_matmul_precision={value!r}; choose one of {', '.join(MATMUL_PRECISIONS)}"
        )
    import torch  # here, not at the top: the argparse CLIs start without torch

    torch.set_float32_matmul_precision(value)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else is passed to torch.device."""
    import torch  # here, not at the top: the argparse CLIs start without torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
