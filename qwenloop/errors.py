"""How a run ends when it does not finish: bad input (``UserError``) or a deliberate stop (``RunStopped``).

A ``UserError`` carries a one-line message that names the file / line / field at fault and what to
do. Entry points catch it, print ``error: <message>`` to stderr and exit with code 2 (no traceback).
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input: a config value, a data file, a model path, an environment that cannot do what was asked."""

    def __init__(self, message: str):
        # One line, always: multi-line messages get lost in the logs of 8 ranks.
        super().__init__(" ".join(str(message).split()))


EXIT_NONFINITE = 3
"""Exit code of a run stopped by the NaN/overflow sentinel (``max_bad_steps`` consecutive bad steps)."""


def exit_code_for_signal(signum: int) -> int:
    """A run stopped by a signal exits like a shell reports it: 128 + signal number (143 SIGTERM, 130 SIGINT)."""
    return 128 + int(signum)


class RunStopped(Exception):
    """The run stopped on purpose before its last step (preempted, or too many non-finite steps).

    ``message`` may span several lines (it is a report); ``exit_code`` is what the CLI exits with.
    """

    def __init__(self, message: str, exit_code: int, checkpoint: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.checkpoint = checkpoint


class CommandParser(argparse.ArgumentParser):
    """argparse for qwenloop's subcommands: a bad command line is bad input like any other, one line
    (``prog: what is wrong`` + ``hint``) and exit code 2 from the CLI, never argparse's own exit."""

    def __init__(self, *args, hint: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.hint = hint

    def error(self, message):
        raise UserError(f"{self.prog}: {message}{self.hint}")
