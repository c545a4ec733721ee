"""A throwaway PostgreSQL server for tests: its own data directory in a temporary folder, a unix socket there and
no TCP listener, stopped and removed afterwards. Tests skip (saying why) without the server binaries or psycopg2."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

USER = "depthsearch"


def binaries() -> Path | None:
    """The folder holding ``initdb`` and ``postgres`` (on PATH, or Debian's /usr/lib/postgresql/<version>/bin)."""
    found = shutil.which("initdb")
    folders = [Path(found).resolve().parent] if found else []
    folders += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((f for f in folders if (f / "initdb").is_file() and (f / "postgres").is_file()), None)


def _unprivileged():
    """PostgreSQL refuses to run as root: as root, run it as ``nobody``."""
    if os.geteuid() != 0:
        return None, None
    nobody = pwd.getpwnam("nobody")

    def drop():
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
    return drop, nobody


@contextlib.contextmanager
def server() -> Iterator[str]:
    """A running server; yields the SQLAlchemy URL of its ``postgres`` database (unix socket, trust auth)."""
    folder = binaries()
    if folder is None:
        pytest.skip("no PostgreSQL server binaries (initdb, postgres) on this machine; apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="PostgreSQL storages need psycopg2 (pip install psycopg2-binary)")
    root = Path(tempfile.mkdtemp(prefix="depthsearch-pg-"))
    drop, nobody = _unprivileged()
    if nobody is not None:
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
    data = root / "data"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "preexec_fn": drop, "cwd": root}
    subprocess.run([folder / "initdb", "-D", data, "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, **quiet)
    process = subprocess.Popen([folder / "postgres", "-D", data, "-k", root, "-c", "listen_addresses=",
                                "-c", "fsync=off", "-c", "max_connections=200"], **quiet)
    try:
        deadline = time.time() + 30
        while not (root / ".s.PGSQL.5432").exists():
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"PostgreSQL did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        yield f"postgresql+psycopg2://{USER}@/postgres?host={root}"
    finally:
        process.send_signal(signal.SIGINT)  # fast shutdown
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(url: str) -> str:
    """A new empty database on the server of ``url``; its URL."""
    import psycopg2

    name = f"t_{uuid.uuid4().hex[:12]}"
    host = url.split("host=", 1)[1]
    connection = psycopg2.connect(dbname="postgres", user=USER, host=host)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return url.replace("/postgres?", f"/{name}?")
