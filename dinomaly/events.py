"""TensorBoard event files in the run folder (--tensorboard; on by default when the tensorboard package is
installed): training's loss, learning rate, data wait and gradient norm every --log_every iterations (train.py),
each evaluation's metrics per class and their mean (evaluate.py). `tensorboard --logdir saved_results` shows them."""
import importlib.util
import logging
import math

from .errors import UserError

log = logging.getLogger("anomaly")


def wanted(mode: str) -> bool:
    """--tensorboard: "auto" (on when the package is installed), "on" (a UserError without it) or "off"."""
    if mode == "off":
        return False
    if importlib.util.find_spec("tensorboard") is not None:
        return True
    if mode == "on":
        raise UserError("--tensorboard on needs the tensorboard package: pip install -r requirements-serve.txt (or "
                        "pip install tensorboard), or pass --tensorboard off")
    return False


class Events:
    """Scalars written into `folder`'s event file (opened on the first write; nothing when `on` is False). step:
    the last step written (an evaluation after training is logged at training's last iteration)."""

    def __init__(self, folder: str, on: bool):
        self.folder, self.on, self.writer, self.step = folder, on, None, 0

    def scalars(self, step: int, values: dict[str, float | None]):
        """{tag: value} at `step`; None and non-finite values are left out. Flushed at once (a crash keeps them)."""
        self.step = step
        if not self.on:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=self.folder)
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()
