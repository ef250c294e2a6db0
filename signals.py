"""Stop signals. SIGINT, SIGTERM and SIGHUP (Ctrl-C, a scheduler's preemption, a closed
terminal or ssh session) end a command with exit status 128 + the signal's number, as a shell reports a process killed by it, so that
schedulers and scripts see the stop. The training loop checkpoints first (StopRequest);
anywhere else the command ends at once (Stopped).
"""
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """A stop signal outside the training loop. A BaseException, like KeyboardInterrupt, so
    that no `except Exception` swallows it."""


def raise_stopped(signum, frame):
    raise Stopped(signum)


def stop_at_once():
    """From now on a stop signal raises Stopped."""
    for signum in SIGNALS:
        signal.signal(signum, raise_stopped)


def exit_at_once():
    """Until stop_at_once: a stop signal ends the process with its one line and status, even
    while a module loads (where Stopped would end it with a traceback)."""
    for signum in SIGNALS:
        signal.signal(signum, lambda signum, frame: exit_stopped(signum))


def exit_stopped(signum, say=True):
    """Ends the command as a stop signal asks; say: print the one line (rank 0)."""
    if say:
        print(f"error: stopped by {signal.Signals(signum).name} before the command finished",
              file=sys.stderr)
    sys.exit(128 + signum)


def name(signum):
    return signal.Signals(signum).name


class StopRequest:
    """Turns a stop signal into a number the training loop checks (the signal's, 0 for none),
    so that it can checkpoint before exiting; the previous handlers come back on close()."""

    def __init__(self):
        self.signum = 0
        self.previous = {signum: signal.signal(signum, self.request) for signum in SIGNALS}

    def request(self, signum, frame):
        self.signum = signum

    def close(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
