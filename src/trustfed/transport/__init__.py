"""Transport: the gRPC federation protocol over mutual TLS 1.3 with signed messages.

Modules: ``federation.proto`` (+ generated ``federation_pb2*``), ``envelope`` (signing,
verification, replay cache), ``streaming`` (chunked model streams), ``tls`` (credentials and
handshake diagnosis), ``settings`` (the ``[transport]`` config section), ``local`` (a whole
federation of processes on one machine, used by ``trustfed demo``).
"""

from trustfed.transport.errors import MessageRejected, TransportError
from trustfed.transport.settings import Limits, TransportSettings

__all__ = ["Limits", "MessageRejected", "TransportError", "TransportSettings"]
