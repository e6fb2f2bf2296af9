"""The one exception type for problems with what the user gave us (config, data, checkpoints)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: shown as one paragraph, exit code 2, no traceback.

    The message must name what is wrong (the key, file, row, checkpoint or model) and, where it helps,
    what to do about it.
    """


EXIT_USAGE = 2
