"""The argument parser and its validators, importable without PyTorch so that `--help` and argument errors
answer at once, and the values flags choose from (cli.py builds the scripts' flags with them).
"""
import argparse
import sys

# The names of the datasets (dataset.DATASETS), for --dataset; the tests check that they and LC_CHOICES match
# their modules. --encoder is checked against models.ENCODERS when given (encoder_name).
DATASET_NAMES = ("mvtec", "visa", "realiad", "mpdd", "btad", "miad", "unimedical", "realiad_variety", "manta")
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
    """argparse with visible defaults, no abbreviated flags, and one-line errors with exit status 2."""

    def __init__(self, description: str | None = None):
        super().__init__(description=description, formatter_class=HelpFormatter, allow_abbrev=False)

    def error(self, message):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


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


def float_in(low: float, high: float, high_open: bool = False):
    """A float in [low, high] (or [low, high) with high_open)."""
    def parse(text: str) -> float:
        value = float(text)
        if not (low <= value <= high) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high}{')' if high_open else ']'}")
        return value
    parse.__name__ = "number"
    return parse


def encoder_name(text: str) -> str:
    """--encoder: one of models.ENCODERS (imported, with PyTorch, only when the flag is given)."""
    from . import models
    if text not in models.ENCODERS:
        raise argparse.ArgumentTypeError(f"unknown encoder {text}; choose one of {', '.join(models.ENCODERS)}")
    return text
