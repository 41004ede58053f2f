"""grc/build/interrupt.py: a Ctrl-C is remembered even when a library turns the KeyboardInterrupt into an error of
its own (what made tests/test_cli.py's Ctrl-C test exit 1 during torch.export in CI), and the handler before it
comes back."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from grc.build import interrupt


def library_call() -> None:
    """A library that catches everything and raises its own error (as torch.export's wrapper did)."""
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode, inside this try
        for _ in range(1000):
            pass
    except BaseException as exc:
        raise RuntimeError("the library's own error") from exc


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signal handlers: main thread")
def test_a_ctrl_c_a_library_swallowed_is_still_seen() -> None:
    before = signal.getsignal(signal.SIGINT)
    with interrupt.watch():
        assert not interrupt.seen()
        with pytest.raises(RuntimeError, match="the library's own error") as err:
            library_call()
        assert isinstance(err.value.__cause__, KeyboardInterrupt)  # the handler still raised it, as Python's does
        assert interrupt.seen()
    assert signal.getsignal(signal.SIGINT) is before
    with interrupt.watch():  # a new command starts unseen
        assert not interrupt.seen()
