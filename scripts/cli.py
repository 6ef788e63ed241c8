"""The command line of the scripts in scripts/: one `error:` line for bad input (exit status 2),
checked before anything is written, and `--help` that shows every default.

    Parser              argparse.ArgumentParser whose errors are one `error:` line, exit status 2
    HelpFormatter       the description as written, every default shown
    check_output(f, p)  the file `p` of flag `f` can be written (its folder made), or UsageError
    check_folder(f, p)  the folder `p` of flag `f` is writable or can be made, or UsageError
    check_device(f, d)  a torch device this build of torch has, or UsageError
"""

from __future__ import annotations

import argparse
import os


class UsageError(Exception):
    """Bad input; the scripts print it as one `error:` line and exit with status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written (examples keep their lines); each flag's default after its
    help, unless the help already says it (a "default" in it) or there is none to show (None, an
    off switch, an empty text or list, --help)."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS
                or (isinstance(default, (str, list, tuple)) and not default)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """Errors of the command line as one line, `error: ...`, exit status 2 (no usage text: --help has it)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # `--seed 1` must not silently mean `--seeds 1`
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def check_output(flag: str, path: str) -> None:
    """Raise UsageError unless `path` can be written as a file: not a folder, and its nearest existing
    folder writable (the folders between are made when it is written)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a folder; give a file path")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path!r} is not writable")
    check_nearest_folder(flag, path, os.path.dirname(os.path.abspath(path)))


def check_nearest_folder(flag: str, path: str, start: str) -> None:
    """Raise UsageError unless the nearest existing folder at or above `start` is a writable folder
    (where `path` and the folders above it will be made)."""
    existing = start
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path!r}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: the folder {existing!r} is not writable")


def check_folder(flag: str, path: str) -> None:
    """Raise UsageError unless `path` is a writable folder or can be made as one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file; give a folder")
    check_nearest_folder(flag, path, os.path.abspath(path))


def check_device(flag: str, device: str) -> None:
    """Raise UsageError unless `device` is cpu, or a cuda device that this torch has."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"{flag} must be cpu, cuda or cuda:N, got {device!r}") from None
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"{flag} must be cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        reason = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise UsageError(f"{flag} {device}: {reason}; use {flag} cpu")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0..)")
