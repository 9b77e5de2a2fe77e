from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvidenceRequest(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class EvidenceReply(_message.Message):
    __slots__ = ("evidence", "backend", "public_key")
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    evidence: bytes
    backend: str
    public_key: bytes
    def __init__(self, evidence: _Optional[bytes] = ..., backend: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class PublicKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublicKeyReply(_message.Message):
    __slots__ = ("public_key", "backend", "measurement")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENT_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    backend: str
    measurement: str
    def __init__(self, public_key: _Optional[bytes] = ..., backend: _Optional[str] = ..., measurement: _Optional[str] = ...) -> None: ...

class SealedUpdate(_message.Message):
    __slots__ = ("participant_id", "round", "enclave_key_id", "sealed", "commitment", "signature")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ENCLAVE_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    round: int
    enclave_key_id: str
    sealed: bytes
    commitment: bytes
    signature: bytes
    def __init__(self, participant_id: _Optional[str] = ..., round: _Optional[int] = ..., enclave_key_id: _Optional[str] = ..., sealed: _Optional[bytes] = ..., commitment: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AggregateRequest(_message.Message):
    __slots__ = ("round", "params", "spec_json", "updates", "selected", "available", "redo")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REDO_FIELD_NUMBER: _ClassVar[int]
    round: int
    params: bytes
    spec_json: str
    updates: _containers.RepeatedCompositeFieldContainer[SealedUpdate]
    selected: _containers.RepeatedScalarFieldContainer[str]
    available: int
    redo: bool
    def __init__(self, round: _Optional[int] = ..., params: _Optional[bytes] = ..., spec_json: _Optional[str] = ..., updates: _Optional[_Iterable[_Union[SealedUpdate, _Mapping]]] = ..., selected: _Optional[_Iterable[str]] = ..., available: _Optional[int] = ..., redo: _Optional[bool] = ...) -> None: ...

class AggregateReply(_message.Message):
    __slots__ = ("params", "receipt", "metrics", "selected")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    params: bytes
    receipt: bytes
    metrics: _containers.ScalarMap[str, float]
    selected: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, params: _Optional[bytes] = ..., receipt: _Optional[bytes] = ..., metrics: _Optional[_Mapping[str, float]] = ..., selected: _Optional[_Iterable[str]] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class StateReply(_message.Message):
    __slots__ = ("statement",)
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    statement: bytes
    def __init__(self, statement: _Optional[bytes] = ...) -> None: ...
