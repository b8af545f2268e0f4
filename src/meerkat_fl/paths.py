"""Checks on the paths a user names for output, made before any work: a ConfigError naming the argument and
the path, instead of an OSError after minutes of computing a mask or loading a model.

Run folders have their own rules (``run.open_run``); these are for single files (a mask, a partition, a plot)
and for folders a command fills from scratch (``meerkat export``, ``meerkat flower certs``).
"""

from __future__ import annotations

import os
from pathlib import Path

from meerkat_fl.errors import ConfigError


def _writable_parent(path: Path, what: str) -> None:
    """The nearest existing folder above ``path`` must be a folder we may write into (the rest is created)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: the folder {parent} is not writable")


def output_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a file to (over)write: not a folder, under folders that exist or can be made, writable."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} is not writable")
    _writable_parent(path, what)
    return path


def output_folder(path: str | os.PathLike[str], what: str, *, overwrite: bool = False) -> Path:
    """``path`` as a folder to write: new or empty, or (``overwrite``) an existing folder whose files of the
    same names are replaced; never a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder")
    if path.is_dir():
        if any(path.iterdir()) and not overwrite:
            raise ConfigError(f"{what} {path} already exists and is not empty: choose another path or pass "
                              "--overwrite")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {path} is not writable")
        return path
    _writable_parent(path, what)
    return path
