"""Where a dataset is (a folder, an http(s) URL prefix, a `pipe:` command), and the bytes of a remote file as a
stream that never hangs: `open_url`.

A read never hangs: a try that gets no byte for `read_timeout` seconds is cut. A failed try (a stall, a reset, an
error) is retried after each of RETRY_DELAYS, resuming where it was cut: an http Range request where the server takes
them, else the file is read again from its start and the bytes already handed out are skipped. Each retry is logged
(a warning); after the last try an OSError says why, in words. An answer that asking again will not change (an HTTP
error but 408 and 429, a redirect loop) fails at once.

http(s) is read by urllib3 (timeouts, redirects, connection reuse); the tries, the resumption and the words for what
went wrong are this module's, since a Range request must go on from the bytes already handed to the tar reader."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import select
import shlex
import signal
import subprocess
import tempfile
import time
from functools import cache
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import urllib3

from dali_skd.errors import ConfigError
from dali_skd.format import check_relative_path

log = logging.getLogger(__name__)

READ_TIMEOUT = 60.0  # seconds without a byte before a remote read is cut (LoaderConfig.read_timeout)
RETRY_DELAYS = (1.0, 4.0)  # pauses before the second and third try of a remote read
MAX_REDIRECTS = 10
_CHUNK = 1 << 20


def is_remote(location: str) -> bool:
    return location.startswith(("http://", "https://", "pipe:"))


def join_location(location: str, relative: str) -> str:
    """The URL of `relative` (a path checked to stay inside the dataset) inside a dataset location.

    A `pipe:` location is a command template with `{}` where the file name goes, e.g.
    `pipe:aws s3 cp s3://bucket/ucf101/{} -`; the path is quoted for the shell (see `PipeStream`)."""
    check_relative_path(relative)
    if location.startswith("pipe:"):
        if "{}" not in location:
            raise ConfigError(f"pipe: location {location!r} needs a '{{}}' where the file name goes")
        return location.replace("{}", shlex.quote(relative))
    if location.startswith(("http://", "https://")):
        return location.rstrip("/") + "/" + relative
    return os.path.join(location, relative)


def open_url(url: str, read_timeout: float = READ_TIMEOUT) -> IO[bytes] | RemoteStream:
    """A readable byte stream for a local path, `http(s)://` URL or `pipe:` command."""
    if not is_remote(url):
        return open(url, "rb", buffering=1 << 20)
    return PipeStream(url, read_timeout) if url.startswith("pipe:") else HttpStream(url, read_timeout)


class _Cut(Exception):
    """One try of a remote read failed; `final`: trying again would meet the same answer."""

    def __init__(self, reason: str, final: bool = False) -> None:
        super().__init__(reason)
        self.final = final


class RemoteStream:
    """The bytes of a remote file, read in tries that are cut when they stall, retried and resumed (the module's
    docstring). A kind of stream opens a try from a byte on (`_open`), receives from it (`_receive`) and ends it
    (`_close`)."""

    def __init__(self, url: str, read_timeout: float = READ_TIMEOUT) -> None:
        self.url, self.read_timeout = url, read_timeout
        self.position = 0  # bytes handed out
        self._tries = 1
        self._open_try: bool = False
        self._skip = 0  # bytes to drop from the start of a try that could not begin at `position`

    def _open(self, position: int) -> int:
        """Starts a try at `position` or before it: the byte it starts at."""
        raise NotImplementedError

    def _receive(self, size: int) -> bytes:
        """Up to `size` bytes of the try (at least one, but at the end); raises _Cut."""
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def read(self, size: int) -> bytes:
        """`size` bytes, fewer only at the end of the stream."""
        chunks, wanted = [], size
        while wanted > 0:
            data = self._next(min(wanted, _CHUNK))
            if not data:
                break
            chunks.append(data)
            wanted -= len(data)
            self.position += len(data)
        return b"".join(chunks)

    def _next(self, size: int) -> bytes:
        while True:
            try:
                if not self._open_try:
                    self._skip = self.position - self._open(self.position)
                    self._open_try = True
                while self._skip:
                    skipped = self._receive(min(self._skip, _CHUNK))
                    if not skipped:
                        raise _Cut(f"it ended before byte {self.position} when read again")
                    self._skip -= len(skipped)
                return self._receive(size)
            except _Cut as e:
                self._retry(e)

    def _retry(self, cut: _Cut) -> None:
        self.close()
        if cut.final:
            raise OSError(str(cut)) from None
        if self._tries > len(RETRY_DELAYS):
            raise OSError(f"{cut} (gave up after {self._tries} tries)") from None
        delay = RETRY_DELAYS[self._tries - 1]
        log.warning("%s: %s at byte %d; trying again in %g s", self.url, cut, self.position, delay)
        self._tries += 1
        time.sleep(delay)

    def close(self) -> None:
        if self._open_try:
            self._open_try = False
            self._close()

    def __enter__(self) -> RemoteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- http(s) --------------------------------------------------------------------------------------------------------

_CONTENT_RANGE = re.compile(r"bytes (\d+)-")


@cache
def _http() -> urllib3.PoolManager:
    """One pool for every reader thread: connections to a server are reused from shard to shard. urllib3 follows
    redirects; every other retry is RemoteStream's, which resumes where a try was cut. (Imported here: a command
    that reads no http(s) does not wait for it.)"""
    import urllib3

    retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=MAX_REDIRECTS)
    return urllib3.PoolManager(maxsize=32, headers={"User-Agent": "dali-skd"}, retries=retries)


class HttpStream(RemoteStream):
    """An http(s) URL, read with urllib3: a try is one GET (from byte N on: a Range request), its connect and each
    of its reads bounded by `read_timeout`."""

    def __init__(self, url: str, read_timeout: float = READ_TIMEOUT) -> None:
        super().__init__(url, read_timeout)
        self._ranges = True  # until the server ignores a Range request
        self._response: urllib3.BaseHTTPResponse | None = None

    def _open(self, position: int) -> int:
        from urllib3.exceptions import HTTPError

        ranged, pool = position > 0 and self._ranges, _http()
        try:
            response = pool.request(
                "GET",
                self.url,
                headers={**pool.headers, "Range": f"bytes={position}-"} if ranged else None,
                preload_content=False,
                timeout=self.read_timeout,  # to connect, and for each read
            )
        except (HTTPError, OSError) as e:
            raise _Cut(*_failure(e, self.read_timeout)) from None
        if response.status == 416 and ranged:  # nothing from `position` on: the file ends there
            response.close()
            return position
        if response.status >= 400:
            response.close()
            final = response.status < 500 and response.status not in (408, 429)  # a timeout, a rate limit: retried
            raise _Cut(f"the server answered HTTP {response.status} ({response.reason})", final)
        if response.headers.get("Content-Type", "").startswith("text/html"):  # no shard or manifest is a web page
            response.close()
            raise _Cut("the server answered with a web page (text/html), not the file: is the URL right?", True)
        if ranged and response.status != 206:  # the whole file again: read from its start, skipping what was handed out
            self._ranges = False
            ranged = False
        said = response.headers.get("Content-Range", "")
        start = _CONTENT_RANGE.match(said) if ranged else None
        if ranged and (start is None or int(start[1]) > position):
            response.close()
            self._ranges = False  # the next try reads the whole file
            raise _Cut(f"the answer to a request for the bytes from {position} on starts elsewhere ({said[:60]!r})")
        self._response = response
        return int(start[1]) if start else 0

    def _receive(self, size: int) -> bytes:
        from urllib3.exceptions import HTTPError

        if self._response is None:  # a Range request past the end
            return b""
        try:
            return self._response.read1(size)
        except (HTTPError, OSError) as e:
            raise _Cut(*_failure(e, self.read_timeout)) from None

    def _close(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.close()  # a connection cut half-way is not reused


def _failure(error: BaseException, timeout: float) -> tuple[str, bool]:
    """Why an http try failed, in words, and whether that is final: from the cause urllib3's exceptions wrap."""
    from urllib3.exceptions import (
        ConnectTimeoutError,
        LocationValueError,
        MaxRetryError,
        NameResolutionError,
        NewConnectionError,
        ProtocolError,
        ReadTimeoutError,
        ResponseError,
        SSLError,
    )

    if isinstance(error, MaxRetryError) and error.reason is not None:
        error = error.reason
    if isinstance(error, ResponseError):  # urllib3's word for running out of redirects
        return f"more than {MAX_REDIRECTS} redirects (a redirect loop?)", True
    if isinstance(error, LocationValueError):
        return "a redirect to a location that is not an http(s) URL", True
    if isinstance(error, ReadTimeoutError):
        return f"no byte for {timeout:g} s", False
    if isinstance(error, NameResolutionError):
        return "the host name does not resolve", False
    if isinstance(error, NewConnectionError):
        return f"the server does not accept connections ({_cause(error)})", False
    if isinstance(error, ConnectTimeoutError):
        return f"no connection within {timeout:g} s", False
    if isinstance(error, SSLError):
        return f"the TLS handshake failed ({_cause(error)})", False
    if isinstance(error, ProtocolError):
        cause = error.args[1] if len(error.args) > 1 else None
        if type(cause).__name__ == "IncompleteRead":
            return f"the transfer ended before the whole file arrived ({_cause(error)})", False
        if "aborted" in str(error.args[0]):
            return f"the server closed the connection without an answer ({_cause(error)})", False
        return f"the connection broke while receiving ({_cause(error)})", False
    return f"{type(error).__name__}: {_cause(error)}", False


def _cause(error: BaseException) -> str:
    """The words of the innermost error: an OSError's strerror, not the repr of its wrappers."""
    seen = error
    while True:
        inner = next((a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)), None)
        inner = inner or seen.__cause__ or seen.__context__
        if inner is None or inner is seen:
            break
        seen = inner
    if isinstance(seen, OSError) and seen.strerror:
        return seen.strerror
    if type(seen).__name__ == "IncompleteRead":
        got, expected = getattr(seen, "partial", None), getattr(seen, "expected", None)
        if isinstance(got, int) and isinstance(expected, int):
            return f"{got:,} bytes of {got + expected:,} came"
    return str(seen)[:200] or type(seen).__name__


# -- pipe: ------------------------------------------------------------------------------------------------------------

_SHELL_SYNTAX = re.compile(r"[|&;<>()$`*?\[~#\n]")  # a `pipe:` command with any of these runs under `sh -c`


class PipeStream(RemoteStream):
    """The output of a `pipe:` command, read through a pipe; a try that stalls is killed with its process group.

    The command runs without a shell (its words split as a shell would, `shlex.split`) unless it holds shell
    syntax (pipes, `;`, `&&`, redirections, `$`, globs), which runs it under `sh -c`. Either way the only text from
    a dataset in it is a checked relative path, quoted for the shell (`join_location`). A retry runs it again and
    skips the bytes already handed out."""

    def __init__(self, url: str, read_timeout: float = READ_TIMEOUT) -> None:
        super().__init__(url, read_timeout)
        self._proc: subprocess.Popen | None = None

    def _command(self) -> list[str]:
        command = self.url.removeprefix("pipe:")
        if _SHELL_SYNTAX.search(command):
            return ["sh", "-c", command]
        try:
            return shlex.split(command)
        except ValueError as e:
            raise OSError(f"cannot split the command into words ({e})") from None

    def _open(self, position: int) -> int:
        command = self._command()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the process, in _close)
        try:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr, start_new_session=True
            )
        except OSError as e:
            self._stderr.close()
            raise OSError(f"cannot run {command[0]} ({e.strerror})") from None
        _running.add(self._proc)
        self._poll = select.poll()
        self._poll.register(self._proc.stdout, select.POLLIN)
        return 0

    def _receive(self, size: int) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        if not self._poll.poll(self.read_timeout * 1000):
            raise _Cut(f"no byte for {self.read_timeout:g} s")
        data = os.read(self._proc.stdout.fileno(), size)
        if data:
            return data
        try:
            code = self._proc.wait(timeout=self.read_timeout)
        except subprocess.TimeoutExpired:
            raise _Cut("the command closed its output but did not exit") from None
        if code:
            raise _Cut(self._exit_reason(code))
        return b""

    def _exit_reason(self, code: int) -> str:
        """Why a try's process failed, in words, with the last line it wrote to stderr."""
        self._stderr.seek(max(0, self._stderr.seek(0, os.SEEK_END) - 4096))
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        said = lines[-1].strip()[:200] if lines else ""
        if code < 0:
            return f"killed by signal {signal.Signals(-code).name}" + (f" ({said})" if said else "")
        return f"the command exited with status {code}" + (f": {said}" if said else "")

    def _close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill(proc)
            _running.discard(proc)
            self._stderr.close()


_running: set[subprocess.Popen] = set()  # readers' processes, killed at exit even if a reading thread is stuck


def _kill(proc: subprocess.Popen) -> None:
    """Ends a reader's process and everything it started (a `sh -c` pipeline), and reaps it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # it and its group are gone already
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.stdout is not None:
        proc.stdout.close()
    proc.wait()


@atexit.register
def _kill_running() -> None:
    for proc in list(_running):
        _kill(proc)
