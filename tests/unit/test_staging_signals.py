"""The swap of a model family cannot be cut by Ctrl-C or SIGTERM, even with other threads running."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest

from export.staging import signals_held


@pytest.fixture
def busy_threads():
    # Threads like torch's, ONNX Runtime's and tqdm's: the kernel may hand a signal to any of them.
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    yield threads
    stop.set()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_the_block_is_delivered_only_after_it(busy_threads, sig):
    got = []
    old = signal.signal(signal.SIGTERM, lambda s, _f: got.append(s))
    # Python's own Ctrl-C handler, whatever this process inherited: a test run started as a
    # background job of a script begins with SIGINT ignored, and an ignored signal raises nothing.
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt) if sig == signal.SIGINT else contextlib.nullcontext():
            with signals_held():
                for _ in range(20):  # many chances for another thread to take it
                    os.kill(os.getpid(), sig)
                    time.sleep(0.005)
                done.append("block finished")
        assert done == ["block finished"]
        if sig == signal.SIGTERM:
            assert got == [signal.SIGTERM]  # once, after the block, to the handler that was there before
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def test_an_ignored_sigint_stays_ignored_after_the_block():
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old_int)


def test_handlers_are_restored_and_nothing_is_raised_without_a_signal():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with signals_held():
        pass
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_outside_the_main_thread_the_signals_are_blocked_for_that_thread():
    seen = []

    def work():
        with signals_held():
            seen.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        seen.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [True, False]

