"""Run a training script with the tiny test encoder, and send this process a signal when iteration AT starts.

    python tests/signal_run.py SIGNAL AT SCRIPT [script options]    (e.g. SIGKILL 7 dinomaly_mvtec_uni.py ...)
    python tests/signal_run.py none 0 SCRIPT [script options]       (the tiny encoder, no signal)

Used by the kill-and-resume tests: a real SIGKILL, SIGINT, SIGTERM or SIGHUP, at a known iteration, in a fresh
process. Under torchrun (`torchrun ... tests/signal_run.py ...`) the first process sends it to the launcher
instead, which passes it on to every process as a cluster's scheduler does.
"""
import importlib
import os
import signal
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]

from dinomaly import cli, models, train  # noqa: E402

from conftest import TINY, TINY_CFG  # noqa: E402

def signal_at(sig: signal.Signals, at: int):
    """Wrap train.train_step so that the signal is sent just before iteration `at` is computed."""
    step = train.train_step

    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def hooked(batch, it, *args, **kwargs):
        if it == at and os.environ.get("RANK", "0") == "0":
            os.kill(launcher or os.getpid(), sig)
        return step(batch, it, *args, **kwargs)

    train.train_step = hooked


if __name__ == "__main__":
    name, at, script, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    models.ENCODERS[TINY] = TINY_CFG
    if name != "none":
        signal_at(signal.Signals[name], at)
    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    cli.run_script(module, argv)
