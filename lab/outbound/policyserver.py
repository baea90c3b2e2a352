"""The lab's MTA-STS policy host (HTTPS on any carrier) and the appliance's policy fetcher (RFC 8461 3.3).

Both ends speak real TLS over the carrier's bytes: the server wraps a Twisted web ``Site`` so that every
connection starts TLS at once (``SessionTransport.startTLS``, as the SMTP listener does after STARTTLS), and the
fetcher is a small HTTP/1.1 client that checks the certificate against the lab CA for ``mta-sts.<domain>``
before it sends its GET. What can go wrong comes back as a ``PolicyError`` carrying the RFC 8460 result type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.python.failure import Failure
from twisted.web import resource, server
from zope.interface import implementer

from lab.net.carrier import ICarrier
from lab.outbound.mtasts import (
    MAX_POLICY_BYTES,
    POLICY_PATH,
    Policy,
    PolicyCache,
    PolicyError,
    StsRecord,
    parse_policy,
    parse_txt,
    resolve,
)
from lab.tls.certs import CertKey
from lab.tls.tlsctx import ClientTLS, ServerTLS, tls_error_reason

HTTPS_PORT = 443
FETCH_TIMEOUT = 60.0  # RFC 8461 3.3: senders should bound the fetch; a minute is the RFC's example
MAX_HEADER_BYTES = 8 * 1024


def policy_host(domain: str) -> str:
    return f"mta-sts.{domain.rstrip('.').lower()}"


# -- the server ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedPolicy:
    """What ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` answers; ``status``/``location``/``content_type``
    let a case publish a broken host (a 404, a redirect, the wrong media type)."""

    text: str
    status: int = 200
    location: str | None = None
    content_type: str = "text/plain"


class _PolicyResource(resource.Resource):
    isLeaf = True

    def __init__(self, published: PublishedPolicy) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        self.published = published

    def render_GET(self, request: Any) -> bytes:
        if request.path != POLICY_PATH.encode():
            request.setResponseCode(404)
            return b"not found\n"
        request.setResponseCode(self.published.status)
        if self.published.location:
            request.setHeader(b"location", self.published.location.encode("ascii"))
        request.setHeader(b"content-type", self.published.content_type.encode("ascii"))
        return self.published.text.encode("utf-8")


class _TLSFirst(Protocol):
    """Starts TLS as soon as the carrier connects, then hands the connection to the HTTP channel."""

    def __init__(self, inner: Any, creator: ServerTLS) -> None:
        self.inner, self.creator = inner, creator

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        transport.startTLS(self.creator)
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.inner.connectionLost(reason)


class _HTTPSFactory(ServerFactory):
    def __init__(self, site: server.Site, creator: ServerTLS) -> None:
        self.site, self.creator = site, creator

    def buildProtocol(self, addr: Any) -> Protocol | None:
        inner = self.site.buildProtocol(addr)  # type: ignore[no-untyped-call]
        return None if inner is None else _TLSFirst(inner, self.creator)


class _QuietSite(server.Site):
    """A Site on the carrier's clock that writes no access log (the lab's own records say what happened)."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def policy_site(published: PublishedPolicy, clock: Any) -> server.Site:
    return _QuietSite(_PolicyResource(published), reactor=clock)  # type: ignore[no-untyped-call]


def serve_policy(
    carrier: ICarrier, ip: str, published: PublishedPolicy, certkey: CertKey, port: int = HTTPS_PORT
) -> Any:
    """Listen on ``ip:port`` of ``carrier`` as the HTTPS policy host presenting ``certkey``; returns the port."""
    return carrier.listen(ip, port, _HTTPSFactory(policy_site(published, carrier.clock), ServerTLS(certkey)))


# -- the fetcher --------------------------------------------------------------------------------------------------


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes] | str:
    """An HTTP/1.1 response read to the connection's end -> (status, headers, body), or why it is not one."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return "the response ended inside its header"
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        return f"not an HTTP status line: {lines[0][:60]!r}"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            return f"not an HTTP header: {line[:60]!r}"
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        decoded = _unchunk(body)
        if decoded is None:
            return "a broken chunked body"
        body = decoded
    elif headers.get("content-length", "").isdigit():
        length = int(headers["content-length"])
        if len(body) < length:
            return f"the body ended after {len(body)} of {length} bytes"
        body = body[:length]
    return int(parts[1]), headers, body


def _unchunk(body: bytes) -> bytes | None:
    out = bytearray()
    while True:
        size_line, sep, rest = body.partition(b"\r\n")
        size_text = size_line.split(b";")[0].strip()
        if not sep or not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            return None
        size = int(size_text, 16)
        if size == 0:
            return bytes(out)
        if len(rest) < size + 2:
            return None
        out += rest[:size]
        body = rest[size + 2 :]


def judge_response(status: int, headers: dict[str, str], body: bytes) -> Policy | PolicyError:
    """RFC 8461 3.3: only a 200 counts (no redirects are followed), served as text/plain; then the file's rules."""
    if 300 <= status < 400:
        return PolicyError("sts-policy-fetch-error", f"HTTP {status} redirect to {headers.get('location', '?')}")
    if status != 200:
        return PolicyError("sts-policy-fetch-error", f"HTTP {status}")
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "text/plain":
        return PolicyError("sts-policy-invalid", f"media type {media or 'none'!r} is not text/plain")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return PolicyError("sts-policy-invalid", "the policy is not UTF-8 text")
    return parse_policy(text)


@implementer(IHandshakeListener)
class _PolicyGet(Protocol):
    """GET the policy once the server's certificate is verified; every end fires ``done`` exactly once."""

    def __init__(self, host: str, creator: ClientTLS, max_bytes: int, done: defer.Deferred[Any]) -> None:
        self.host, self.creator, self.max_bytes, self.done = host, creator, max_bytes, done
        self.buffer = bytearray()
        self.verified = False
        self.result: Policy | PolicyError | None = None

    def connectionMade(self) -> None:
        self.transport.startTLS(self.creator)  # type: ignore[union-attr]  # a SessionTransport: ITLSTransport

    def handshakeCompleted(self) -> None:
        if not self.creator.server_cert_verified(self.transport.getHandle()):  # type: ignore[union-attr]
            self.finish(PolicyError("sts-webpki-invalid", f"the certificate of {self.host} does not verify"))
            return
        self.verified = True
        request = f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n"
        self.transport.write(request.encode("ascii"))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > self.max_bytes + MAX_HEADER_BYTES:
            self.finish(PolicyError("sts-policy-fetch-error", f"the response is over {self.max_bytes} bytes"))

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.result is not None:
            return
        if not self.verified:
            why = tls_error_reason(reason.value) if reason is not None and reason.value else "connection lost"
            self.finish(PolicyError("sts-policy-fetch-error", f"TLS with {self.host} failed: {why}"))
            return
        parsed = parse_response(bytes(self.buffer))
        if isinstance(parsed, str):
            self.finish(PolicyError("sts-policy-fetch-error", parsed))
        elif len(parsed[2]) > self.max_bytes:
            self.finish(PolicyError("sts-policy-fetch-error", f"the response is over {self.max_bytes} bytes"))
        else:
            self.finish(judge_response(*parsed))

    def finish(self, result: Policy | PolicyError) -> None:
        if self.result is not None:
            return
        self.result = result
        if self.transport is not None and isinstance(result, PolicyError):
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if not self.done.called:
            self.done.callback(result)


def fetch_policy(
    carrier: ICarrier,
    src_ip: str | None,
    dst_ip: str,
    domain: str,
    trust_pems: Sequence[bytes],
    *,
    port: int = HTTPS_PORT,
    timeout: float = FETCH_TIMEOUT,
    max_bytes: int = MAX_POLICY_BYTES,
) -> defer.Deferred[Policy | PolicyError]:
    """Fetch ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` from ``dst_ip`` (the caller resolved the name).

    Fires with the ``Policy`` or a ``PolicyError``; never fails. The deadline runs on the carrier's clock.
    """
    host = policy_host(domain)
    done: defer.Deferred[Policy | PolicyError] = defer.Deferred()
    creator = ClientTLS(server_name=host, verify=True, trust_pems=trust_pems)
    fetch = _PolicyGet(host, creator, max_bytes, done)
    factory: ClientFactory = ClientFactory.forProtocol(lambda: fetch)  # type: ignore[assignment]

    def refused(failure: Failure) -> None:
        fetch.finish(PolicyError("sts-policy-fetch-error", f"cannot connect to {host}: {failure.getErrorMessage()}"))

    carrier.connect(src_ip, dst_ip, port, factory).addErrback(refused)
    timer = carrier.clock.callLater(
        timeout, lambda: fetch.finish(PolicyError("sts-policy-fetch-error", f"no answer from {host} in {timeout:g} s"))
    )
    done.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
    return done


def current_policy(
    carrier: ICarrier,
    cache: PolicyCache,
    domain: str,
    txt_records: Sequence[str],
    src_ip: str | None,
    host_ip: str | None,
    trust_pems: Sequence[bytes],
    *,
    fetched: Callable[[Policy | PolicyError], None] | None = None,
    **fetch_options: Any,
) -> defer.Deferred[Policy | PolicyError | None]:
    """The MTA-STS policy in force for ``domain`` before a delivery: the ``_mta-sts`` TXT strings decide whether
    to fetch (a new id, nothing cached), the cache answers otherwise (RFC 8461 5.1). ``host_ip`` is the address
    of ``mta-sts.<domain>`` (None: the name does not resolve, a fetch error). None: the domain has no policy.
    ``fetched`` sees what a fetch brought, when one was needed (the answer may still be the cached policy)."""
    record = parse_txt(txt_records)
    if not isinstance(record, StsRecord) or not cache.needs_fetch(domain, record):
        return defer.succeed(resolve(cache, domain, record, None))
    if host_ip is None:
        failure = PolicyError("sts-policy-fetch-error", f"{policy_host(domain)} does not resolve")
        if fetched is not None:
            fetched(failure)
        return defer.succeed(resolve(cache, domain, record, failure))

    def judged(result: Policy | PolicyError) -> Policy | PolicyError | None:
        if fetched is not None:
            fetched(result)
        return resolve(cache, domain, record, result)

    return fetch_policy(carrier, src_ip, host_ip, domain, trust_pems, **fetch_options).addCallback(judged)
