"""The data report: every record of a file that cannot be used, each as ``file:line: what is wrong; what to
do``, so that a file with four bad lines is fixed in one pass, not four runs.

Training (``bad_records: error``, the default) logs the report and stops with one ``UserError`` line that
counts the bad records and quotes the first; ``bad_records: skip`` logs the same report once and trains on
the rest. ``qwenloop data`` prints it without loading a model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from .errors import UserError

logger = logging.getLogger(__name__)

REPORT_LIMIT = 20
"""Bad records listed in a log; the rest are counted (``qwenloop data FILE --max-errors 0`` lists them all)."""


@dataclass
class DataReport:
    path: str
    records: int  # records in the file (blank lines are not records)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (location, what is wrong; what to do), in file order

    def lines(self, limit: int = REPORT_LIMIT) -> list[str]:
        """The report, one bad record a line, ``limit`` of them at most (0: all)."""
        n = len(self.problems)
        shown = self.problems if limit <= 0 else self.problems[:limit]
        out = [f"data report: {self.path}: {n} of {self.records} record(s) cannot be used:"]
        out += [f"  {where}: {what}" for where, what in shown]
        if n > len(shown):
            out.append(f"  ... and {n - len(shown)} more (qwenloop data {self.path} --max-errors 0 lists them all)")
        return out

    def error(self) -> UserError:
        """The one line a run stops with (the report itself is logged before it)."""
        where, what = self.problems[0]
        if len(self.problems) == 1:
            return UserError(f"{where}: {what} (1 bad record of {self.records}; bad_records: skip would leave it out)")
        return UserError(
            f"{self.path}: {len(self.problems)} of {self.records} records cannot be used (the data report above lists "
            f"them; the first is {where}: {what}); fix them, or set bad_records: skip to train without them"
        )

    def nothing_left(self) -> UserError:
        where, what = self.problems[0]
        return UserError(
            f"{self.path}: none of its {self.records} records can be used (the data report above lists why; the first "
            f"is {where}: {what}); fix the file: bad_records: skip leaves bad records out, but not all of them"
        )

    def log(self, level: int, last_line: str = "") -> None:
        """Log the report once per run: on the main process (``RANK`` 0, or unset in a single process).
        Every rank builds the dataset, and eight copies of a long report would bury everything else."""
        if self.problems and int(os.environ.get("RANK", "0") or 0) == 0:
            logger.log(level, "\n".join(self.lines() + ([last_line] if last_line else [])))
