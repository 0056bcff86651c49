"""What the command line needs, importable without PyTorch so that `--help` and argument errors answer at once:
the argument parser and its validators, and the values flags choose from or default to. The scripts parse
their arguments with these before they import the engine (cli.launch).
"""
import argparse
import sys

# The names of the datasets (dataset.DATASETS), for --dataset; the tests check that they and LC_CHOICES match
# their modules. --encoder is checked against models.ENCODERS when given (cli.encoder_name).
DATASET_NAMES = ("mvtec", "visa", "realiad", "mpdd", "btad", "miad", "unimedical", "realiad_variety", "manta")
LC_CHOICES = (0, 1, 2, 3, 4, 11, 12, 14)  # Dinomaly2's --lc: the keys of models.vitill.GROUPINGS
PRECISIONS = ("fp32", "tf32", "bf16")  # --precision, see speed.py
CACHE_MODES = ("none", "memory", "disk")  # --cache_images, see image_cache.py
VAL_SHARE = 0.2  # --val_share: good images of a class without a test folder held out for its threshold
FALSE_ALARM_RATE = 0.01  # --false_alarm_rate: where there are no defect images, see thresholds.py
ADAM_EPS = 1e-10  # --adam_eps: StableAdamW's epsilon in the multi-class scripts (the class-separated ones: 1e-8)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help shows its default, unless the default is None or a switch's False."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with visible defaults, no abbreviated flags, and one-line errors with exit status 2.
    `dataset_defaults` {dataset: {dest: value}}: values that depend on --dataset, set where the command line and
    the defaults leave None."""

    def __init__(self, description: str | None = None):
        super().__init__(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
        self.dataset_defaults: dict[str, dict] = {}

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        for key, value in self.dataset_defaults.get(getattr(ns, "dataset", None), {}).items():
            if getattr(ns, key, None) is None:
                setattr(ns, key, value)
        return ns

    def error(self, message):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)

    def explicit(self, argv: list[str] | None) -> set[str]:
        """The destinations of the options given on the command line (not left at their defaults)."""
        unset = object()
        ns = argparse.Namespace(**{a.dest: unset for a in self._actions})
        self.parse_known_args(argv, namespace=ns)
        return {k for k, v in vars(ns).items() if v is not unset}


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
