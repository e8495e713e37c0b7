"""Fixtures shared by test modules."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import zarr


@pytest.fixture
def one_thread():
    """Small tensors: one torch thread is as fast, and far faster on a busy machine.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def sigkill_once_written():
    """``run(command, store, at_least, blocks=None)``: start ``command``, SIGKILL it once at
    least ``at_least`` blocks (of ``blocks``) of the store at ``store`` are flagged written
    (or after 180 s, or when it exits by itself), and wait for it."""

    def run(command: list[str], store: Path, at_least: int, blocks: range | None = None) -> None:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, done = time.monotonic() + 180, 0
        while done < at_least and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
            try:
                flags = zarr.open_group(store, mode="r")["block_complete"][:]
            except (FileNotFoundError, KeyError, ValueError):  # not created yet
                continue
            done = int(flags.sum() if blocks is None else flags[blocks.start : blocks.stop].sum())
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    return run
