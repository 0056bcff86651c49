"""The one exception type for problems a user can fix (a bad path, file, argument or checkpoint).

Scripts report it as one line on stderr and exit with status 2; anything else is an internal error (exit 1).
"""
import re

import torch


class UserError(Exception):
    """A problem the user can fix: reported as one line naming the thing and what to do, exit status 2."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def user_message(e: BaseException) -> str:
    """The one line reported for a UserError (also one re-raised from a data-loader worker, whose message then
    carries the worker's traceback) or for running out of GPU memory."""
    if isinstance(e, torch.OutOfMemoryError):
        size = re.search(r"Tried to allocate ([\d.]+ \w+)", str(e))
        asked = f" (it asked for {size.group(1)} more)" if size else ""
        return f"the GPU ran out of memory{asked}; use a smaller --batch_size, or --precision bf16"
    text = str(e)
    if "Original Traceback" in text:  # the worker's traceback ends with "UserError: <message>"
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return one_line(text)
