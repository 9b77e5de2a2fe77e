"""Secure aggregation (SecAgg, SecAgg+): sans-I/O client and server state machines (pairwise masks,
Shamir shares)."""

from trustfed.secagg.protocol import (
    PublicKeys,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    SecureSum,
    TooFewParticipants,
    UnmaskShares,
    dequantize_sum,
    quantize,
    secure_sum,
)

__all__ = [
    "PublicKeys",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggServer",
    "SecureSum",
    "TooFewParticipants",
    "UnmaskShares",
    "dequantize_sum",
    "quantize",
    "secure_sum",
]
