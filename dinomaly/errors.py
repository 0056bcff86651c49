"""The one exception type for problems a user can fix (a bad path, file, argument or checkpoint).

Scripts report it as one line on stderr and exit with status 2; anything else is an internal error (exit 1).
`check_entries` checks what is read back from a file we wrote (thresholds.json, config.json, train_state.pth)
against a table of key -> `Expect` (number, integer, choice, kind), one UserError line per problem.
"""
import math
import re
import sys


class UserError(Exception):
    """A problem the user can fix: reported as one line naming the thing and what to do, exit status 2."""


class InputError(UserError, ValueError):
    """A value the Python API cannot use (an image array of the wrong shape, type or range, an empty list): a
    UserError that is also a ValueError, so `except ValueError` catches it as well."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def user_message(e: BaseException) -> str:
    """The one line reported for a UserError (also one re-raised from a data-loader worker, whose message then
    carries the worker's traceback) or for running out of GPU memory."""
    torch = sys.modules.get("torch")  # imported by the command if it used it (not by an exported model's)
    if torch is not None and isinstance(e, torch.OutOfMemoryError):
        size = re.search(r"Tried to allocate ([\d.]+ \w+)", str(e))
        asked = f" (it asked for {size.group(1)} more)" if size else ""
        return f"the GPU ran out of memory{asked}; use a smaller --batch_size, or --precision bf16"
    text = str(e)
    if "Original Traceback" in text:  # the worker's traceback ends with "UserError: <message>"
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return one_line(text)


# ----------------------------------------------------------------------------------------------- checking files

class Expect:
    """What one value read from a file must be: `test(value)` is true for an acceptable value, `text` says what
    is acceptable; `required`: whether the key must be there."""

    def __init__(self, test, text: str, required: bool = True):
        self.test, self.text, self.required = test, text, required

    def optional(self) -> "Expect":
        return Expect(self.test, self.text, required=False)

    def or_null(self) -> "Expect":
        return Expect(lambda v: v is None or self.test(v), self.text + " or null", self.required)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(lo: float = -math.inf, hi: float = math.inf, hi_open: bool = False, lo_open: bool = False) -> Expect:
    """A finite number in [lo, hi] (open ends as asked)."""
    def test(v):
        return _real(v) and math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if math.isfinite(lo) and math.isfinite(hi):
        text = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    else:
        text = f" {'>' if lo_open else '>='} {lo:g}" if math.isfinite(lo) else \
            f" {'<' if hi_open else '<='} {hi:g}" if math.isfinite(hi) else ""
    return Expect(test, "a finite number" + text)


def integer(lo: int) -> Expect:
    return Expect(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"an integer >= {lo}")


def choice(*values) -> Expect:
    return Expect(lambda v: v in values, "one of " + ", ".join(map(repr, values)))


def kind(types, name: str) -> Expect:
    return Expect(lambda v: isinstance(v, types), name)


def check_entries(data: dict, table: dict[str, Expect], where: str, fix: str):
    """Check the entries of `data` that `table` names (dotted keys for nested mappings: "image.threshold"),
    leaving the others alone. A missing required key or a refused value is a one-line UserError naming `where`,
    the key and what is expected, then `fix`."""
    for key, expect in table.items():
        value, found = data, True
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                found = False
                break
            value = value[part]
        if not found:
            if expect.required:
                raise UserError(f"{where} has no {key} ({expect.text}); {fix}")
        elif not expect.test(value):
            shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
            raise UserError(f"{where}: {key} is {shown}, expected {expect.text}; {fix}")
