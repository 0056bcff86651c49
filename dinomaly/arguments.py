"""The argument parser and its validators, importable without PyTorch so that `--help` and argument errors
answer at once, and the values flags choose from (cli.py builds the scripts' flags with them).
"""
import argparse
import difflib
import sys

# The names of the datasets (dataset.DATASETS), for --dataset; the tests check that they and LC_CHOICES match
# their modules. --encoder is checked against encoders.ENCODERS (encoder_name).
DATASET_NAMES = ("mvtec", "visa", "realiad", "mpdd", "btad", "miad", "unimedical", "realiad_variety", "manta",
                 "mvtec3d", "mulsen")
LC_CHOICES = (0, 1, 2, 3, 4, 11, 12, 14)  # Dinomaly2's --lc: the keys of models.vitill.GROUPINGS
PRECISIONS = ("fp32", "tf32", "bf16")  # --precision, see speed.py
CACHE_MODES = ("none", "memory", "disk")  # --cache_images, see image_cache.py


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help shows its default, unless the default is None or a switch's False."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with visible defaults, no abbreviated flags, and one-line errors with exit status 2. An unknown
    flag is named with the closest known one, or with the scripts that offer it (`elsewhere`: flag -> where)."""

    def __init__(self, description: str | None = None, epilog: str | None = None):
        super().__init__(description=description, epilog=epilog, formatter_class=HelpFormatter, allow_abbrev=False)
        self.elsewhere: dict[str, str] = {}

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            message += self.unknown_hint(message.split(": ", 1)[1].split())
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)

    def unknown_hint(self, words: list[str]) -> str:
        flags = [w.split("=")[0] for w in words if w.startswith("--")]
        for flag in flags:
            if flag in self.elsewhere:
                return f" ({flag} is a flag of {self.elsewhere[flag]}, not of this script)"
        known = [o for a in self._actions for o in a.option_strings]
        close = [m for f in flags for m in difflib.get_close_matches(f, known, n=1, cutoff=0.8)]
        return f" (did you mean {close[0]}?)" if close else ""


def int_at_least(low: int, high: int | None = None):
    """An integer >= low (and <= high when given)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is more than {high}")
        return value
    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float, high_open: bool = False, low_open: bool = False):
    """A float in [low, high] (open at either end with high_open, low_open)."""
    def parse(text: str) -> float:
        value = float(text)
        if not (low <= value <= high) or (high_open and value == high) or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"{value} is not in {'(' if low_open else '['}{low}, {high}"
                                             f"{')' if high_open else ']'}")
        return value
    parse.__name__ = "number"
    return parse


def encoder_name(text: str) -> str:
    """--encoder: one of the registry's (encoders.ENCODERS)."""
    from .encoders import ENCODERS
    if text not in ENCODERS:
        raise argparse.ArgumentTypeError(f"unknown encoder {text}; choose one of {', '.join(ENCODERS)}")
    return text
