"""One writer per study, whatever directory it runs from: a claim stored in the study's own storage.

A run holds a RUNNING claim (``search.record``: command, pid, host, output directory, start, heartbeat) while it
writes; another run is refused with one message naming it. A claim whose holder is dead is taken over: on the
same host its process is gone, from another host its heartbeat (every ``HEARTBEAT_S``) is older than ``STALE_S``.
Two runs that claim at the same moment each write their claim and then read every claim; since any storage shows
a write to every later read, at least one of them sees the other, and each that does withdraws: never two
holders. Both withdrawing is settled by a random pause and one more try.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
import uuid
from typing import Iterator

from search.record import StudyInUseError, StudyRecord, open_record
from search.stored import HEARTBEAT_S, Writer

RELEASED, REFUSED, TAKEN_OVER = 0.0, 1.0, 2.0  # the value a finished claim is stored with
TRIES = 4


def live_writers(record: StudyRecord) -> tuple[list[Writer], list[int]]:
    """(live writers, numbers of dead or damaged claims) of the study."""
    now, live, dead = time.time(), [], []
    for number, attrs in record.claims():
        writer = Writer.read(number, attrs)
        if writer is not None and writer.alive(now):
            live.append(writer)
        else:
            dead.append(number)
    return live, dead


def in_use_message(record: StudyRecord, writer: Writer) -> str:
    return (f"study {record.study.study_name!r} in {record.where} is being written by {writer.describe()}; one run "
            "writes a study at a time, whatever its output_dir (executor workers scale one run out): wait for it to "
            "finish, or stop it, then run again")


def writer_problem(url: str, name: str) -> str | None:
    """Why a run cannot write the study ``name`` in ``url`` now: another live run holds it (reads only)."""
    record = open_record(url, create=False, name=name)
    live = [] if record is None else live_writers(record)[0]
    return in_use_message(record, live[0]) if live else None


@contextlib.contextmanager
def writer_claim(record: StudyRecord, command: str, output_dir: str = "") -> Iterator[None]:
    """Hold the claim to write ``record``'s study while inside (a heartbeat keeps it fresh); refused with
    :class:`StudyInUseError` naming the holder while another live run holds it."""
    number = _take(record, command, output_dir)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(record, number, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        record.finish_claim(number, RELEASED)


def _take(record: StudyRecord, command: str, output_dir: str) -> int:
    for _ in range(TRIES):
        live, dead = live_writers(record)
        for number in dead:
            record.finish_claim(number, TAKEN_OVER)
        if live:
            raise StudyInUseError(in_use_message(record, live[0]))
        token = uuid.uuid4().hex
        record.add_claim({"token": token, "command": command, "pid": os.getpid(), "host": socket.gethostname(),
                          "output_dir": output_dir, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "heartbeat": time.time()})
        live, _ = live_writers(record)
        mine = next(w.number for w in live if w.token == token)
        others = [w for w in live if w.token != token]
        if not others:
            return mine
        record.finish_claim(mine, REFUSED)
        time.sleep(random.uniform(0.2, 1.5))
    raise StudyInUseError(in_use_message(record, others[0]))


def _heartbeat(record: StudyRecord, number: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            if not record.beat_claim(number, time.time()):
                return
        except Exception:  # noqa: BLE001 - a busy or unreachable storage: the next beat tries again
            continue
