"""Notebook-run settings (nbmake executes every notebook in-process with nbclient).

Why notebooks used to idle for exactly ``--nbmake-timeout`` seconds: nbclient waits for a cell's
``execute_reply`` with one ``await shell_socket.poll(timeout)`` (pyzmq asyncio, which sleeps on the socket's
edge-triggered ``zmq.FD``). In a cell that displays an ipywidgets ``Output`` (``interactive_output``,
``interact``), nbclient's Output-widget emulation *sends* comm messages on that same shell socket from its
IOPub task while the poll is pending; the send makes libzmq process the socket's pending commands, which can
swallow the edge that announced the reply. The kernel's reply is then in the socket (measured: sent ~9.8 s
before it was read with a 10 s timeout) but the wait only ends when the timeout fires and pyzmq's final
non-blocking poll finds it -- so the cell "completes without error" after exactly the timeout, in whichever
widget cell the race happens to hit (nbclient issue #312 reports the same hang).

The fix here: every timed wait of the kernel client is cut into short slices, each ending with pyzmq's
level-triggered ``poll(0)``, so a swallowed edge costs at most ``_SLICE_S`` instead of the whole timeout.
The total timeout is unchanged (a really hanging cell still fails at ``--nbmake-timeout``).
"""
from __future__ import annotations

import time
from queue import Empty

from jupyter_client.channels import AsyncZMQSocketChannel

_SLICE_S = 0.05   # longest extra wait after a swallowed wake-up; 20 level-triggered polls/s cost ~nothing
_original_get_msg = AsyncZMQSocketChannel.get_msg


async def _get_msg_in_slices(self, timeout: float | None = None):
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = _SLICE_S if deadline is None else min(_SLICE_S, max(0.0, deadline - time.monotonic()))
        try:
            return await _original_get_msg(self, timeout=left)
        except Empty:
            if deadline is not None and time.monotonic() >= deadline:
                raise


if not getattr(AsyncZMQSocketChannel.get_msg, "_dstar_edu_sliced", False):
    _get_msg_in_slices._dstar_edu_sliced = True
    AsyncZMQSocketChannel.get_msg = _get_msg_in_slices
