"""Joining a Ray cluster for ``RayEngine``: connect (bounded, token auth), keep Ray quiet.

``connect`` turns every way a connection fails into one ``RayClusterError`` line within seconds:
Ray's own ``ray.init`` retries an unreachable GCS for about two minutes and then raises a bare
``ConnectionError`` with a traceback, and a cluster started with ``ray start`` (token
authentication on by default since Ray 2.5x) refuses a client that does not send its token.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RayClusterError

# Seconds for the TCP probe of the cluster's address (a LAN or VPN round trip is < 1 s).
CONNECT_TIMEOUT_S = 3.0
# Seconds Ray may spend on the GCS handshake once the port answers (Ray's own default is ~20 s
# of retries, two minutes for an unreachable host); read by Ray from this environment variable.
GCS_WAIT_S = 5
_GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
# Where Ray looks for the token (ray/_private/authentication/authentication_token_setup.py).
_DEFAULT_TOKEN = Path.home() / ".ray" / "auth_token"
# Default port of a Ray Client server (``ray://host``).
_CLIENT_PORT = 10001


@dataclass
class Connection:
    """How ``connect`` joined Ray: ``started`` says whether to shut it down afterwards."""

    address: str | None
    started: bool
    log_file: str


def resolve_address(address: str | None) -> tuple[str | None, str]:
    """The address to join and where it came from (``--address``, ``RAY_ADDRESS`` or none)."""
    if address:
        return address, "--address"
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env, "RAY_ADDRESS"
    return None, "none"


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host[:port]``; None for ``auto``/``local``."""
    if address in ("auto", "local"):
        return None
    rest, port = address, 6379  # Ray's default GCS port
    if rest.startswith("ray://"):
        rest, port = rest[len("ray://") :], _CLIENT_PORT
    rest = rest.split("/", 1)[0]
    host, sep, p = rest.rpartition(":")
    if not sep:
        return rest.strip("[]"), port
    try:
        return host.strip("[]"), int(p)
    except ValueError:
        raise RayClusterError(
            f"cannot parse the Ray address {address!r}: use host:port (e.g. 10.0.0.5:6379, the "
            "head's GCS port) or ray://host:10001"
        ) from None


def token_source() -> str | None:
    """Where this client's Ray auth token comes from, or None when it has none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and os.path.isfile(path):
        return path
    if _DEFAULT_TOKEN.is_file():
        return str(_DEFAULT_TOKEN)
    return None


def _enable_token_mode() -> None:
    """Turn on token auth in this process (Ray reads RAY_AUTH_MODE into its cached config)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    with contextlib.suppress(Exception):  # a Ray without the cached config reads the env
        from ray._raylet import Config  # type: ignore[attr-defined]

        Config.initialize("")


def _reload_token() -> None:
    """Forget a token Ray cached in this process (an earlier cluster's), read the current one."""
    with contextlib.suppress(Exception):
        from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

        AuthenticationTokenLoader.instance().reset_cache()


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _is_auth_error(exc: BaseException) -> bool:
    for e in _chain(exc):
        text = f"{type(e).__name__} {e}"
        if "AuthenticationError" in text or "InvalidAuthToken" in text or "auth token" in text:
            return True
    return False


def default_log_file() -> str:
    """Ray's log lines of this run go here unless verbose (Ray's own temp folder, /tmp/ray)."""
    folder = Path(tempfile.gettempdir()) / "ray"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"embedkit-extract-{os.getpid()}.log")


@contextlib.contextmanager
def _stderr_to(log_file: str | None) -> Iterator[None]:
    """Point file descriptor 2 at ``log_file`` (None: leave it): Ray's C++ core prints to it.

    Needed while ``ray.init`` runs even with ``RAY_BACKEND_LOG_LEVEL=fatal``: the core worker
    announces that level with an INFO line on stderr before applying it.
    """
    if log_file is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables that are unset, for the duration of the block."""
    added = [k for k, v in values.items() if k not in os.environ]
    for k in added:
        os.environ[k] = values[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def connect(ray: Any, address: str | None, *, verbose: bool, log_file: str) -> Connection:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local Ray when none.

    Raises:
        RayClusterError: unreachable, refused (auth) or not answering, within seconds.
    """
    if ray.is_initialized():
        return Connection(None, False, log_file)
    address, origin = resolve_address(address)
    # Ray's INFO lines and the driver's C++ warnings (glog to stderr) stay off the terminal.
    backend = {} if verbose else {"RAY_BACKEND_LOG_LEVEL": "fatal"}
    init_args = {"include_dashboard": False, "log_to_driver": verbose}
    if address is None:
        with _env(**backend), _stderr_to(None if verbose else log_file):
            ray.init(**init_args)
        return Connection(None, True, log_file)
    hp = _host_port(address)
    check = (
        f"check that the cluster runs there (`ray start --head --port {hp[1]}`), that this "
        "machine can reach that port (firewall, VPN), and the address"
        if hp
        else "check that a Ray cluster runs on this machine (`ray status`)"
    )
    if hp is not None:
        try:
            socket.create_connection(hp, timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
            raise RayClusterError(
                f"cannot reach the Ray cluster at {address} (from {origin}): TCP connection to "
                f"{hp[0]}:{hp[1]} failed ({reason}, {CONNECT_TIMEOUT_S:.0f} s timeout); {check}"
            ) from None
    source = token_source()
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None and source is not None:
        _enable_token_mode()  # Ray sends a token only when told to; ``ray start`` requires one
        mode = "token"
    if mode == "token":
        tried = (
            f"token auth with the token from {source}"
            if source
            else (
                "token auth, but no token was found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, "
                f"{_DEFAULT_TOKEN})"
            )
        )
    else:
        tried = f"no authentication (RAY_AUTH_MODE={mode or 'unset'}" + (
            f", although a token is at {source})" if source else ", no token found)"
        )
    _reload_token()
    try:
        with (
            _env(**{_GCS_WAIT_ENV: str(GCS_WAIT_S)}, **backend),
            _stderr_to(None if verbose else log_file),
        ):
            ray.init(address=address, **init_args)
    except Exception as e:  # Ray raises ConnectionError, RuntimeError or AuthenticationError
        with contextlib.suppress(Exception):
            ray.shutdown()
        if _is_auth_error(e):
            raise RayClusterError(
                f"the Ray cluster at {address} (from {origin}) refused this client: tried "
                f"{tried}; give this machine the cluster's token (run `ray get-auth-token` on the "
                "head, then set RAY_AUTH_TOKEN or write it to ~/.ray/auth_token) and set "
                "RAY_AUTH_MODE=token"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RayClusterError(
            f"cannot join the Ray cluster at {address} (from {origin}): the port answers but Ray "
            f"did not connect within ~{GCS_WAIT_S} s ({first}; tried {tried}); check that it is "
            f"the head's GCS port (6379 unless `ray start --port` said otherwise) and that the "
            f"cluster runs Ray {getattr(ray, '__version__', '?')} like this machine"
        ) from None
    return Connection(address, True, log_file)


def _ray_loggers() -> list[logging.Logger]:
    return [logging.getLogger(n) for n in ("ray", "ray.data")]


@contextlib.contextmanager
def quiet(verbose: bool, log_file: str) -> Iterator[None]:
    """Route Ray's Python log lines and warnings to ``log_file`` unless ``verbose``."""
    if verbose:
        yield
        return
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    muted: list[tuple[logging.Handler, int]] = []
    loggers = _ray_loggers()
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                muted.append((h, h.level))
                h.setLevel(logging.CRITICAL + 1)
        lg.addHandler(handler)
    original = warnings.showwarning
    ray_dir = os.sep + "ray" + os.sep

    def show(message: Any, category: Any, filename: str, lineno: int, *a: Any, **k: Any) -> None:
        if ray_dir in filename or category.__module__.startswith("ray"):
            handler.emit(
                logging.LogRecord(
                    "py.warnings",
                    logging.WARNING,
                    filename,
                    lineno,
                    f"{category.__name__}: {message}",
                    None,
                    None,
                )  # fmt: skip
            )
        else:
            original(message, category, filename, lineno, *a, **k)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original
        for lg in loggers:
            lg.removeHandler(handler)
        for h, level in muted:
            h.setLevel(level)
        handler.close()


def say(line: str) -> None:
    """A status line on stderr (waiting for resources), outside the progress bar."""
    print(line, file=sys.stderr, flush=True)
