"""Authenticate first, then read: the gRPC server guard of the coordinator and of the enclave.

:class:`ServerGuard` is a server interceptor. It re-registers every method with a raw-bytes
request deserializer and reads the request only from inside the call, so for every RPC, in order:

1. the caller is authenticated from the TLS auth context alone (certificate from the federation CA,
   unexpired, not revoked, a role allowed for this method): no byte of the body has been read yet,
   so a revoked or wrong-role peer's request is never received past the HTTP/2 flow-control
   window, never parsed and never buffered;
2. the caller takes one of its in-flight slots and one token of its rate (per certificate), so one
   participant cannot hold the worker pool with long polls or flood it;
3. each request message is checked against the size limit for the caller's role and method, then
   parsed; a message that does not parse is refused with ``INVALID_ARGUMENT`` (``malformed``);
4. the servicer runs; an exception it did not expect is answered with a documented status and one
   log line, never ``UNKNOWN`` with a traceback and the exception text echoed to the peer.

Parsing in the handler instead of in gRPC also closes a leak: gRPC's own deserialization failure
path (grpcio 1.85) answers ``INTERNAL`` but keeps the call's state alive, about 22 KB of resident
memory per malformed request.

Every refusal is a documented status with a short reason code, ``"<RPC>: <reason>: <detail>"``;
the detail never carries raw peer text (see :func:`trustfed.transport.logsafe.clean`). Refusals
are logged after authentication, through a :class:`~trustfed.transport.logsafe.LogBudget`.

=======================  ======================  ==========================================
status                   reason codes            when
=======================  ======================  ==========================================
UNAUTHENTICATED          no_client_certificate   the TLS session carries no client certificate
PERMISSION_DENIED        tls_version             not TLS 1.3 (coordinator)
PERMISSION_DENIED        certificate_refused     another CA, expired, revoked, or no trustfed identity
PERMISSION_DENIED        wrong_role              the certificate's role may not call this method
PERMISSION_DENIED        bad_signature, replay,  the signed envelope fails a check
                         sender_mismatch, ...    (:mod:`trustfed.transport.envelope`)
RESOURCE_EXHAUSTED       too_many_calls          the caller already has its maximum of calls in flight
RESOURCE_EXHAUSTED       rate_limited            the caller sent more calls than its rate allows
RESOURCE_EXHAUSTED       too_large               a request message over the caller's size limit
INVALID_ARGUMENT         no_message, malformed   no request message, or one that does not parse
FAILED_PRECONDITION      round_not_open, ...     the request does not fit the federation's state
INTERNAL                 internal_error          a server bug (logged as one line; traceback at DEBUG)
=======================  ======================  ==========================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc

from trustfed.errors import TrustFedError
from trustfed.transport.errors import MessageRejected
from trustfed.transport.logsafe import LogBudget, clean

STATUS_OF_REASON: dict[str, grpc.StatusCode] = {
    "no_client_certificate": grpc.StatusCode.UNAUTHENTICATED,
    "tls_version": grpc.StatusCode.PERMISSION_DENIED,
    "certificate_refused": grpc.StatusCode.PERMISSION_DENIED,
    "wrong_role": grpc.StatusCode.PERMISSION_DENIED,
    "too_many_calls": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "no_message": grpc.StatusCode.INVALID_ARGUMENT,
    "malformed": grpc.StatusCode.INVALID_ARGUMENT,
    "internal_error": grpc.StatusCode.INTERNAL,
}

# Statuses a trustfed server answers a peer with; anything else (UNKNOWN above all) is a bug.
DOCUMENTED_STATUSES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)

# What a malformed request raises while it is parsed or read (protobuf's DecodeError is a ValueError
# subclass in the upb backend and an Exception subclass in the pure-Python one: matched by name).
_MALFORMED = (ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeError, TrustFedError)


def is_malformed(exc: BaseException) -> bool:
    return isinstance(exc, _MALFORMED) or type(exc).__name__ == "DecodeError"


class Refusal(MessageRejected):
    """A request refused with a gRPC status and a reason code from :data:`STATUS_OF_REASON`."""

    def __init__(self, reason: str, detail: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(reason, detail)
        self.code = code or STATUS_OF_REASON.get(reason, grpc.StatusCode.PERMISSION_DENIED)


def throttled(code: grpc.StatusCode, detail: str) -> bool:
    """A refusal by the per-participant limits (for now): the caller backs off and retries."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and (": too_many_calls:" in detail or ": rate_limited:" in detail)


def status_detail(rpc: str, reason: str, detail: str) -> str:
    """The status detail a peer sees: the RPC, the reason code and a cleaned, capped explanation."""
    return f"{rpc}: {reason}: {clean(detail, 200)}"


@dataclass(frozen=True)
class Caller:
    """Who a call comes from, as its TLS certificate says (checked before any byte of the body)."""

    name: str
    role: str
    serial: int

    @property
    def key(self) -> str:
        """What per-peer limits count against: one certificate."""
        return f"{self.role}:{self.name}:{self.serial}"


Authenticate = Callable[[grpc.ServicerContext, str], Caller]  # (context, method) -> caller, or raise Refusal
RequestLimit = Callable[[Caller, str], int]  # (caller, method) -> largest request message in bytes


class Admission(Protocol):
    """Per-caller admission (see :class:`trustfed.transport.access.PeerLimiter`)."""

    def enter(self, key: str) -> str | None:
        """Take a slot for ``key``; None if admitted, else the refusal reason."""

    def leave(self, key: str) -> None:
        """Give back the slot :meth:`enter` took."""


def _aborted(context: grpc.ServicerContext) -> bool:
    """The servicer already chose a status (``context.abort`` raises a bare Exception after setting it)."""
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


class ServerGuard(grpc.ServerInterceptor):  # type: ignore[misc]
    """Authenticates, admits, size-checks and parses every request before the servicer sees it."""

    def __init__(
        self,
        where: str,
        authenticate: Authenticate,
        request_limit: RequestLimit,
        admission: Admission,
        log: logging.Logger,
        *,
        budget: LogBudget | None = None,
    ) -> None:
        self.where = where
        self.authenticate = authenticate
        self.request_limit = request_limit
        self.admission = admission
        self.log = log
        self.budget = budget or LogBudget()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        full = handler_call_details.method
        if full in self._handlers:
            return self._handlers[full]
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED
        guarded = self._wrap(full.rpartition("/")[2], handler)
        if len(self._handlers) < 256:
            self._handlers[full] = guarded
        return guarded

    # -- refusals
    def refuse(self, context: grpc.ServicerContext, rpc: str, who: str, refusal: Refusal) -> NoReturn:
        # a call gRPC already ended (the client cancelled, or the message was over gRPC's own limit) is not logged
        write, suppressed = self.budget.take(refusal.reason) if context.is_active() else (False, 0)
        if write:
            more = f" [{suppressed} similar refusal(s) not logged]" if suppressed else ""
            self.log.warning(
                "%s refused %s from %s: %s (%s)%s",
                self.where,
                rpc,
                clean(who, 100),
                clean(refusal.detail, 200),
                refusal.reason,
                more,
                extra={"reason": refusal.reason, "rpc": rpc},
            )
        context.abort(refusal.code, status_detail(rpc, refusal.reason, refusal.detail))
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def _unexpected(self, exc: Exception, rpc: str) -> Refusal:
        if is_malformed(exc):
            return Refusal("malformed", f"the request does not parse or holds an invalid value ({type(exc).__name__})")
        self.log.debug("%s: unexpected %s in %s", self.where, type(exc).__name__, rpc, exc_info=exc)
        return Refusal("internal_error", f"the {self.where} failed on this request ({type(exc).__name__})")

    def _answer(self, context: grpc.ServicerContext, rpc: str, who: str, exc: Exception) -> NoReturn:
        if isinstance(exc, Refusal):
            self.refuse(context, rpc, who, exc)
        if isinstance(exc, MessageRejected):
            self.refuse(context, rpc, who, Refusal(exc.reason, exc.detail))
        if _aborted(context):
            raise exc
        self.refuse(context, rpc, who, self._unexpected(exc, rpc))

    # -- admission and parsing
    @contextmanager
    def _admitted(self, context: grpc.ServicerContext, rpc: str) -> Iterator[Caller]:
        caller = self.authenticate(context, rpc)
        reason = self.admission.enter(caller.key)
        if reason is not None:
            why = "too many calls in flight" if reason == "too_many_calls" else "too many calls per second"
            raise Refusal(reason, f"{caller.role} {caller.name} has {why}; retry later")
        try:
            yield caller
        finally:
            self.admission.leave(caller.key)

    def _parse(self, raw: bytes, caller: Caller, rpc: str, parse: Callable[[bytes], Any]) -> Any:
        limit = self.request_limit(caller, rpc)
        if len(raw) > limit:
            raise Refusal("too_large", f"a request message of {len(raw)} bytes; at most {limit} for this role")
        return parse(raw)

    def _one(self, requests: Iterator[bytes], caller: Caller, rpc: str, parse: Callable[[bytes], Any]) -> Any:
        raw = next(requests, None)
        if raw is None:
            raise Refusal("no_message", "the call carried no request message")
        return self._parse(raw, caller, rpc, parse)

    def _wrap(self, rpc: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The same method, reading raw request bytes only after authentication. A unary request is
        served as a stream of one message (the same on the wire) so that nothing is read before."""
        parse: Callable[[bytes], Any] = handler.request_deserializer or (lambda raw: raw)
        out = handler.response_serializer
        peer = _peer_label

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary
            streaming_in = handler.stream_unary is not None

            def unary_out(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
                try:
                    with self._admitted(context, rpc) as caller:
                        if streaming_in:
                            return inner((self._parse(r, caller, rpc, parse) for r in requests), context)
                        return inner(self._one(requests, caller, rpc, parse), context)
                except Exception as exc:
                    self._answer(context, rpc, peer(context), exc)

            return grpc.stream_unary_rpc_method_handler(unary_out, response_serializer=out)

        inner_s = handler.unary_stream or handler.stream_stream
        streaming_in_s = handler.stream_stream is not None

        def stream_out(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                with self._admitted(context, rpc) as caller:
                    if streaming_in_s:
                        yield from inner_s((self._parse(r, caller, rpc, parse) for r in requests), context)
                    else:
                        yield from inner_s(self._one(requests, caller, rpc, parse), context)
            except Exception as exc:
                self._answer(context, rpc, peer(context), exc)

        return grpc.stream_stream_rpc_method_handler(stream_out, response_serializer=out)


def _peer_label(context: grpc.ServicerContext) -> str:
    """The caller for a log line: its certificate's identity if it has one, else its address."""
    ids = context.auth_context().get("x509_subject_alternative_name") or []
    names = [i.decode("latin-1") for i in ids if i.startswith(b"urn:trustfed:id:")]
    return names[0].removeprefix("urn:trustfed:id:") if names else str(context.peer())
