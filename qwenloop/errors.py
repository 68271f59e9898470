"""The one exception type for problems the user can fix.

A ``UserError`` carries a one-line message that names the file / line / field at fault and what to
do. Entry points catch it, print ``error: <message>`` to stderr and exit with code 2 (no traceback).
Anything else that escapes is a bug and keeps its traceback.
"""

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input: a config value, a data file, a model path, an environment that cannot do what was asked."""

    def __init__(self, message: str):
        # One line, always: multi-line messages get lost in the logs of 8 ranks.
        super().__init__(" ".join(str(message).split()))
