"""ZeroMQ socket safety shared by every link: exposure warning, message caps, IPv6, CURVE.

- A socket bound beyond loopback (anything but 127.0.0.0/8, ::1, localhost, ipc://, inproc://)
  logs a warning (stderr for the command line), saying whether the link is authenticated.
- `recv_capped` receives one multipart message part by part and drops the whole message when its
  total size or part count exceeds the cap (ZMQ_MAXMSGSIZE only bounds a single part).
- `tcp://[::1]:PORT` and other IPv6 literals get ZMQ_IPV6 (libzmq refuses them otherwise).
- CURVE (`CurveKeys`): keys from `zmq.auth.create_certificates` files (`NAME.key` public,
  `NAME.key_secret` both). A binding socket is the CURVE server; it accepts the clients whose
  public keys lie in `--curve-clients DIR`, or, without it, any client that knows its public key.
  A connecting socket is a client and needs the server's public key. Detector links (DECTRIS
  PUSH, Merlin raw TCP) cannot do CURVE: they need an isolated network.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 << 20  # default cap on one whole multipart message
MAX_MESSAGE_PARTS = 256  # DECTRIS V1 headers have ~10 parts, everything else 1-4

# ---------------------------------------------------------------------------- endpoints
# the one grammar of every endpoint the project takes: tcp://HOST:PORT with HOST a name, an IPv4
# address, an IPv6 address in brackets or * (binding), PORT digits or * (binding); ipc://PATH;
# inproc://NAME
_ENDPOINT = re.compile(
    r"tcp://(?P<host>\[[0-9a-fA-F:.]+\]|\*|[A-Za-z0-9][A-Za-z0-9.\-_]*):(?P<port>\d{1,5}|\*)"
    r"|(?:ipc|inproc)://\S+"
)


def valid_endpoint(endpoint: str) -> bool:
    """Whether `endpoint` is a ZeroMQ endpoint of the grammar above."""
    return _ENDPOINT.fullmatch(endpoint) is not None


def endpoint_host(endpoint: str) -> str | None:
    """The host of a tcp:// endpoint (brackets stripped); None for other transports."""
    m = _ENDPOINT.fullmatch(endpoint)
    return m.group("host").strip("[]") if m and m.group("host") else None


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on 127.0.0.0/8, ::1 or localhost."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint_host(endpoint)
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # *, an interface name or a host name: beyond loopback
        return False


def is_ipv6(endpoint: str) -> bool:
    host = endpoint_host(endpoint)
    return host is not None and ":" in host


CURVE_HINT = "--curve-secret authenticates and encrypts ZeroMQ links"
DETECTOR_HINT = "detector protocols cannot be authenticated: use an isolated network"


def warn_if_exposed(endpoint: str, role: str, authenticated: bool, hint: str = CURVE_HINT) -> bool:
    """Log a warning when `role` binds beyond loopback; True when it did."""
    if is_loopback(endpoint):
        return False
    how = ("CURVE-authenticated and encrypted" if authenticated else
           f"unauthenticated and unencrypted: anyone who can reach this host can connect "
           f"({hint})")  # fmt: skip
    log.warning("%s is bound to %s, beyond loopback; the link is %s", role, endpoint, how)
    return True


# ---------------------------------------------------------------------------- CURVE
class CurveError(ValueError):
    """A key file or key folder that cannot be used."""


def _z85_key(key: bytes | None, path: str, what: str) -> bytes:
    if key is None or len(key) != 40:
        raise CurveError(f"{path}: no {what} (a 40-character Z85 key) in this file")
    try:
        z85.decode(key)
    except (ValueError, KeyError):
        raise CurveError(f"{path}: the {what} is not Z85") from None
    return key


@dataclass(frozen=True)
class CurveKeys:
    """One side's CURVE key pair, the server key it trusts (clients) and the client keys it
    accepts (servers; None: any client that knows the server's public key)."""

    public_key: bytes
    secret_key: bytes
    server_key: bytes | None = None
    client_keys: frozenset[bytes] | None = None

    @classmethod
    def load(cls, secret_file: str, server_key_file: str | None = None,
             clients_dir: str | None = None) -> CurveKeys:  # fmt: skip
        """Keys from `zmq.auth` certificate files; CurveError (one line) when unusable."""
        try:
            public, secret = zmq.auth.load_certificate(secret_file)
        except (OSError, ValueError) as exc:
            raise CurveError(f"cannot read {secret_file}: {exc}") from None
        secret = _z85_key(secret, secret_file, "secret key (give the .key_secret file)")
        public = _z85_key(public, secret_file, "public key")
        mode = os.stat(secret_file).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is readable by other users: chmod 600 it", secret_file)
        server = None
        if server_key_file is not None:
            try:
                server, _ = zmq.auth.load_certificate(server_key_file)
            except (OSError, ValueError) as exc:
                raise CurveError(f"cannot read {server_key_file}: {exc}") from None
            server = _z85_key(server, server_key_file, "public key")
        clients = None
        if clients_dir is not None:
            if not Path(clients_dir).is_dir():
                raise CurveError(f"{clients_dir} is not a folder of client public keys (*.key)")
            try:
                found = zmq.auth.load_certificates(clients_dir)
            except (OSError, ValueError) as exc:
                raise CurveError(f"cannot read the client keys in {clients_dir}: {exc}") from None
            clients = frozenset(_z85_key(k, clients_dir, "public key") for k in found)
            if not clients:
                raise CurveError(f"no client public keys (*.key) in {clients_dir}")
        return cls(public, secret, server, clients)


_domains = itertools.count(1)
_auth_lock = threading.Lock()
_authenticators: dict[int, tuple[zmq.Context, object]] = {}  # id(context): (it, handler)


class _Allowed:
    """ZAP credentials provider of one server socket (its own ZAP domain)."""

    def __init__(self, keys: frozenset[bytes] | None):
        self.keys = keys
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = self.keys is None or key in self.keys
        if not allowed:
            self.refused += 1  # a refused client retries every ~0.1 s: log a few, then rarely
            if self.refused <= 3 or self.refused % 1000 == 0:
                log.warning("refused a CURVE client with an unknown key %s (%d refusals)",
                            key.decode(), self.refused)  # fmt: skip
        return allowed


def _authenticator(ctx: zmq.Context):
    """The context's ZAP handler (one per context, started on first use)."""
    from zmq.auth.thread import ThreadAuthenticator

    with _auth_lock:
        entry = _authenticators.get(id(ctx))
        if entry is None:
            entry = (ctx, ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap")))
            entry[1].start()
            _authenticators[id(ctx)] = entry
        return entry[1]


def release_context(ctx: zmq.Context) -> None:
    """Stop the context's ZAP handler (if any) and terminate it: waits for every socket's
    linger, so queued messages are sent (or dropped at linger) before the process goes on."""
    with _auth_lock:
        entry = _authenticators.pop(id(ctx), None)
    if entry is not None:
        entry[1].stop()
    ctx.term()


def _apply_server(sock: zmq.Socket, curve: CurveKeys) -> None:
    domain = f"tcbf-{next(_domains)}"
    _authenticator(sock.context).configure_curve_callback(domain, _Allowed(curve.client_keys))
    sock.zap_domain = domain.encode()
    sock.curve_secretkey = curve.secret_key
    sock.curve_publickey = curve.public_key
    sock.curve_server = True


def _apply_client(sock: zmq.Socket, curve: CurveKeys) -> None:
    if curve.server_key is None:
        raise CurveError("a connecting socket needs the server's public key (--curve-server-key)")
    sock.curve_secretkey = curve.secret_key
    sock.curve_publickey = curve.public_key
    sock.curve_serverkey = curve.server_key


# ---------------------------------------------------------------------------- sockets
def _prepare(sock: zmq.Socket, endpoint: str) -> None:
    if is_ipv6(endpoint):
        sock.setsockopt(zmq.IPV6, 1)


def bind(sock: zmq.Socket, endpoint: str, role: str, curve: CurveKeys | None = None,
         hint: str = CURVE_HINT) -> None:  # fmt: skip
    """Bind (as the CURVE server when `curve`); warn when beyond loopback."""
    _prepare(sock, endpoint)
    if curve is not None:
        _apply_server(sock, curve)
    sock.bind(endpoint)
    warn_if_exposed(endpoint, role, curve is not None, hint)


def connect(sock: zmq.Socket, endpoint: str, curve: CurveKeys | None = None) -> None:
    """Connect (as a CURVE client when `curve`)."""
    _prepare(sock, endpoint)
    if curve is not None:
        _apply_client(sock, curve)
    sock.connect(endpoint)


def set_receive_cap(sock: zmq.Socket, max_message_bytes: int) -> None:
    """libzmq's per-part cap (a peer exceeding it is disconnected); `recv_capped` adds the
    whole-message cap."""
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)


SENDER_SOCKETS = {"pub": zmq.XPUB, "push": zmq.PUSH}  # XPUB: a PUB that sees subscriptions
RECEIVING = (zmq.SUB, zmq.PULL)
# worker links (DEALER, ROUTER) and the control endpoint (REP, REQ)
BOTH_WAYS = {k: (zmq.RCVHWM, zmq.SNDHWM) for k in (zmq.DEALER, zmq.ROUTER, zmq.REP, zmq.REQ)}


def open_link(ctx: zmq.Context, kind: int, endpoint: str, *, bind_here: bool, hwm: int,
              role: str, linger_s: float = 0.0, max_message_bytes: int = 4096,
              curve: CurveKeys | None = None, hint: str = CURVE_HINT,
              identity: bytes | None = None) -> zmq.Socket:  # fmt: skip
    """Every socket of the project is opened here: `kind` (zmq.SUB, PULL, PUB, XPUB, PUSH;
    DEALER, ROUTER for the worker link, both directions bounded),
    `hwm` messages queued (receive or send side), `linger_s` to send them at close, every
    message part capped at `max_message_bytes` (a sending socket receives a few-byte
    subscription at most; receivers add `recv_capped`'s whole-message cap), SUB subscribed to
    everything, bound (warning beyond loopback) or connected, CURVE when given keys. No
    socket is left behind when binding or connecting fails."""
    sock = ctx.socket(kind)
    try:
        for option in BOTH_WAYS.get(kind, (zmq.RCVHWM if kind in RECEIVING else zmq.SNDHWM,)):
            sock.setsockopt(option, hwm)
        sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
        set_receive_cap(sock, max_message_bytes)
        if identity is not None:  # a DEALER's name at its ROUTER
            sock.setsockopt(zmq.IDENTITY, identity)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        if bind_here:
            bind(sock, endpoint, role, curve, hint)
        else:
            connect(sock, endpoint, curve)
    except Exception:
        sock.close(linger=0)
        raise
    return sock


def open_sender(ctx: zmq.Context, endpoint: str, socket_type: str, role: str, send_hwm: int,
                linger_s: float, curve: CurveKeys | None = None,
                hint: str = CURVE_HINT) -> zmq.Socket:  # fmt: skip
    """A bound sending socket ("pub" or "push"): `send_hwm` messages queued, `linger_s` to
    send them at close."""
    return open_link(ctx, SENDER_SOCKETS[socket_type], endpoint, bind_here=True, hwm=send_hwm,
                     role=role, linger_s=linger_s, curve=curve, hint=hint)  # fmt: skip


def tcp_host_port(endpoint: str) -> tuple[str, int]:
    """(host, port) of a raw TCP link's tcp://HOST:PORT (an IPv6 host in brackets; no
    wildcards); ValueError for anything else."""
    m = _ENDPOINT.fullmatch(endpoint)
    if m is None or not m.group("host") or "*" in (m.group("host"), m.group("port")):
        raise ValueError(f"raw TCP needs tcp://HOST:PORT, got {endpoint!r}")
    return m.group("host").strip("[]"), int(m.group("port"))


class OversizedMessage(Exception):
    """A whole multipart message over the cap (already drained from the socket)."""


def recv_capped(sock: zmq.Socket, max_bytes: int, max_parts: int = MAX_MESSAGE_PARTS,
                flags: int = zmq.NOBLOCK) -> list[zmq.Frame]:  # fmt: skip
    """One multipart message as zero-copy frames, counted as the parts arrive (RCVMORE). Over
    `max_bytes` in total or `max_parts` parts: the rest is drained, every part released, and
    OversizedMessage raised. zmq.Again when nothing is queued (with NOBLOCK)."""
    frame = sock.recv(flags, copy=False)
    parts: list[zmq.Frame] | None = [frame]
    total, count = len(frame), 1
    while frame.more:  # libzmq delivers a multipart message whole: the rest is queued
        frame = sock.recv(0, copy=False)
        total += len(frame)
        count += 1
        if parts is not None:
            if total > max_bytes or count > max_parts:
                parts = None  # release what was kept; keep draining
            else:
                parts.append(frame)
    if parts is None:
        raise OversizedMessage(
            f"message of {count} parts, {total} bytes (cap {max_parts} parts, {max_bytes} bytes)"
        )
    return parts


LINGER_MS = 200  # a served socket's queued messages may take this long once it closes


class ServedSocket:
    """A bound socket served by one daemon thread running the subclass's `_run` until `_stop`
    is set: the result stream (`publisher`) and the control endpoint (`control`). The socket is
    closed by the thread that uses it, as it ends (libzmq sockets are not thread-safe: closing
    one under a send in another thread aborts the process); `close` stops the thread and waits
    for it."""

    def __init__(self, sock: zmq.Socket, name: str):
        self._sock = sock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _serve(self) -> None:
        try:
            self._run()
        finally:  # a reply just queued (the control endpoint's answer to "stop") still goes
            self._sock.close(linger=LINGER_MS)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.ident is None:  # never started: nothing else holds the socket
            self._sock.close(linger=0)
        elif self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("%s still busy after %.0f s: its socket closes when it ends",
                            self._thread.name, timeout_s)  # fmt: skip
