"""Stopping a command cleanly on SIGINT (Ctrl-C) or SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator

from featsync import logs


class Stop(threading.Event):
    """Set when a stop was asked for; `signum`: the signal that asked (None: none did)."""

    signum: int | None = None

    @property
    def exit_code(self) -> int:
        """What a command stopped by the signal exits with: 128 + its number (130 for
        SIGINT, 143 for SIGTERM), as a shell reports a process the signal killed."""
        return 128 + (self.signum or signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(command: str = "reconcile") -> Iterator[Stop]:
    """SIGINT (Ctrl-C) or SIGTERM: send nothing more, let the calls in flight finish and
    be recorded, end the cycle (or verify's check) with its summary; a second one stops
    at once. The events are `<command>_stopping` and `<command>_stopped_at_once`.

    The handler only sets flags (it runs in the main thread between two bytecodes, maybe
    while that thread holds the log's write lock: logging there would deadlock); a small
    thread says that the stop was heard.
    """
    stop = Stop()
    caught: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if caught:
            # Now, without waiting for the calls in flight: the ledger is one transaction
            # per outcome, the lock goes with the process, and a call whose outcome is
            # not recorded is repeated once by the next run (every call is idempotent).
            # A raw write, no lock: a line of its own even if it cuts into another.
            line = {"event": f"{command}_stopped_at_once", "signal": signal.Signals(signum).name}
            os.write(2, b"\n" + json.dumps(line).encode() + b"\n")
            os._exit(128 + signum)
        caught.append(signum)
        stop.signum = signum
        stop.set()

    def announce() -> None:
        stop.wait()
        if caught:
            name = signal.Signals(caught[0]).name
            logs.get().warning(f"{command}_stopping", signal=name, then="Ctrl-C again")

    before = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    herald = threading.Thread(target=announce, name="featsync-stop", daemon=True)
    herald.start()
    try:
        yield stop
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        stop.set()  # ends the herald if no signal came
        herald.join()
