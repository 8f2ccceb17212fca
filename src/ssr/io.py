"""File I/O shared by every part of ssr: atomic writes, safe checkpoint reads, strict loading.

Written once here so that every file ssr produces (checkpoints, exports, converted labels, the
synthetic dataset, SAM feature caches, metrics) is either complete or absent after a crash, and
every weight file is read with `weights_only=True` and checked key for key.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from ssr.errors import UserError

_SHOW = 5  # how many key names an error message lists


class WriteError(UserError):
    """A file cannot be written (folder, permissions, full disk); the old file is untouched."""


class CheckpointError(UserError):
    """A weight file is missing, unreadable, of an unknown layout, or does not fit the model."""


# ---------------------------------------------------------------------------- atomic writes
def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], durable: bool = True) -> None:
    """`write(file)` into a temporary sibling of `path`, then rename it over `path`.

    A kill or an error at any point leaves either the old file or the new one, never a torn file;
    the temporary file is removed on failure (KeyboardInterrupt included). `durable` also fsyncs
    the file and its folder, so the rename survives a power loss, and removes the temporaries of
    earlier killed writers of `path` (checkpoints, exports: few files per folder). Bulk writers of
    small files that can be regenerated (labels, synthetic images) skip both; they sweep their
    folders once with `remove_stale_temps_in`. Any OS failure is one `WriteError` line.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder; name a file", str(path))
        # os.open applies the umask (mkstemp would create a 0600 file).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise WriteError(
                f"no space left on device at {path}; the previous {path.name}, if any, is intact"
            ) from err
        raise WriteError(f"cannot write {path}: {err.strerror or err}") from err
    if durable:
        _fsync_dir(path.parent)
        remove_stale_temps(path)


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), durable)


def atomic_write_json(path: str | Path, obj: Any, durable: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n", durable)


def atomic_write_png(path: str | Path, image: Any, durable: bool = False) -> None:
    """A PNG of a Pillow image or an array (uint8 (H, W) -> L, (H, W, 3) -> RGB, uint16 ->
    I;16), written atomically; not fsynced by default: whoever wrote it can write it again."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    atomic_write(path, lambda f: image.save(f, format="PNG"), durable)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (the directory entry), where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(path: Path) -> None:
    """Delete the temporary files of `path` that killed writers left behind (their pid is gone)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        _remove_if_stale(tmp)


def remove_stale_temps_in(folder: Path) -> None:
    """Delete every temporary file in `folder` whose writer was killed (one pass per folder)."""
    for tmp in folder.glob(".*.tmp"):
        _remove_if_stale(tmp)


def _remove_if_stale(tmp: Path) -> None:
    parts = tmp.name.split(".")  # "", name parts..., pid, hex, "tmp"
    pid = parts[-3] if len(parts) >= 4 else ""
    if pid.isdigit() and not _pid_alive(int(pid)):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------- finding
def find_files(root: str | Path, pattern: str) -> list[Path]:
    """Files under `root` (at any depth) whose name matches `pattern`, sorted.

    Symbolic links to folders are followed (linked city folders are a common way to assemble
    dataset subsets; `Path.rglob` skips them), each real folder once, so a link loop ends.
    """
    import fnmatch

    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        found += [Path(folder) / f for f in fnmatch.filter(files, pattern)]
    return sorted(found)


# -------------------------------------------------------------------------------- reading
def load_torch_file(
    path: str | Path, what: str = "checkpoint", hint: str = "", mmap: bool = False
) -> Any:
    """`torch.load(weights_only=True)` on the CPU; every failure is one `CheckpointError` line.

    `what` names the file in messages ("SAM checkpoint"); `hint` says what was expected; `mmap`
    maps the file instead of reading it (to look at a few entries of a large checkpoint).
    """
    import re

    import torch

    path = Path(path)
    expected = f"; {hint}" if hint else ""
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found{expected or '; check the path'}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for damaged files: all are one line here
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise CheckpointError(
                f"{path}: holds a {refused.group(1)} object, which safe loading refuses; "
                "re-save it with only tensors and plain containers"
            ) from e
        raise CheckpointError(
            f"{path}: not a readable {what} (truncated or corrupt? {type(e).__name__}){expected}"
        ) from e


# --------------------------------------------------------------------------- strict loading
def state_dict_problems(expected: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Why `given` cannot be loaded strictly where `expected` (a module's state dict) is.

    Returns readable items ("2 missing keys [a, b]", ...); empty when the two fit key for key.
    """
    import torch

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    not_tensor = [k for k in expected if k in given and not isinstance(given[k], torch.Tensor)]
    mismatched = [
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and isinstance(given[k], torch.Tensor) and given[k].shape != expected[k].shape
    ]
    return [
        f"{len(keys)} {label} {first_items(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("non-tensor values", not_tensor),
            ("shape mismatches", mismatched),
        )
        if keys
    ]


def load_strict(module: Any, state: Mapping[str, Any], source: Any, what: str, hint: str) -> None:
    """`module.load_state_dict(state, strict=True)` with one readable `CheckpointError` line."""
    problems = state_dict_problems(module.state_dict(), state)
    if problems:
        raise CheckpointError(f"{source}: {what} does not fit: {'; '.join(problems)} ({hint})")
    module.load_state_dict(dict(state), strict=True)


def first_items(items: list) -> str:
    shown = ", ".join(str(x) for x in items[:_SHOW])
    return f"[{shown}{', ...' if len(items) > _SHOW else ''}]"
