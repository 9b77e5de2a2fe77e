from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PlanStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_STATUS_UNSPECIFIED: _ClassVar[PlanStatus]
    WAIT: _ClassVar[PlanStatus]
    TRAIN: _ClassVar[PlanStatus]
    DONE: _ClassVar[PlanStatus]

class SecAggStep(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_STEP_UNSPECIFIED: _ClassVar[SecAggStep]
    SECAGG_KEYS: _ClassVar[SecAggStep]
    SECAGG_SHARES: _ClassVar[SecAggStep]
    SECAGG_SURVIVORS: _ClassVar[SecAggStep]
    SECAGG_UNMASK: _ClassVar[SecAggStep]
    SECAGG_CONSISTENCY: _ClassVar[SecAggStep]
PLAN_STATUS_UNSPECIFIED: PlanStatus
WAIT: PlanStatus
TRAIN: PlanStatus
DONE: PlanStatus
SECAGG_STEP_UNSPECIFIED: SecAggStep
SECAGG_KEYS: SecAggStep
SECAGG_SHARES: SecAggStep
SECAGG_SURVIVORS: SecAggStep
SECAGG_UNMASK: SecAggStep
SECAGG_CONSISTENCY: SecAggStep

class Envelope(_message.Message):
    __slots__ = ("msg_type", "round", "sender_id", "nonce", "timestamp_ms", "body_sha256", "signature", "signer_cert")
    MSG_TYPE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    BODY_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERT_FIELD_NUMBER: _ClassVar[int]
    msg_type: str
    round: int
    sender_id: str
    nonce: bytes
    timestamp_ms: int
    body_sha256: bytes
    signature: bytes
    signer_cert: bytes
    def __init__(self, msg_type: _Optional[str] = ..., round: _Optional[int] = ..., sender_id: _Optional[str] = ..., nonce: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., body_sha256: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., signer_cert: _Optional[bytes] = ...) -> None: ...

class SignedMessage(_message.Message):
    __slots__ = ("envelope", "body")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    body: bytes
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., body: _Optional[bytes] = ...) -> None: ...

class StreamPart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SignedMessage
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[SignedMessage, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("participant_id", "after_round", "wait_ms")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    after_round: int
    wait_ms: int
    def __init__(self, participant_id: _Optional[str] = ..., after_round: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class RoundPlan(_message.Message):
    __slots__ = ("status", "round", "participants", "config_json", "model_hash", "spec_json", "model_bytes", "chunk_bytes", "deadline_ms", "retry_after_ms", "model_commitment", "enclave_quote", "enclave_public_key", "session")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    ENCLAVE_QUOTE_FIELD_NUMBER: _ClassVar[int]
    ENCLAVE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    status: PlanStatus
    round: int
    participants: _containers.RepeatedScalarFieldContainer[str]
    config_json: str
    model_hash: str
    spec_json: str
    model_bytes: int
    chunk_bytes: int
    deadline_ms: int
    retry_after_ms: int
    model_commitment: bytes
    enclave_quote: bytes
    enclave_public_key: bytes
    session: str
    def __init__(self, status: _Optional[_Union[PlanStatus, str]] = ..., round: _Optional[int] = ..., participants: _Optional[_Iterable[str]] = ..., config_json: _Optional[str] = ..., model_hash: _Optional[str] = ..., spec_json: _Optional[str] = ..., model_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., retry_after_ms: _Optional[int] = ..., model_commitment: _Optional[bytes] = ..., enclave_quote: _Optional[bytes] = ..., enclave_public_key: _Optional[bytes] = ..., session: _Optional[str] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("round", "model_hash")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_hash: str
    def __init__(self, round: _Optional[int] = ..., model_hash: _Optional[str] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("round", "spec_json", "total_bytes", "chunk_bytes", "num_chunks", "model_hash")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    round: int
    spec_json: str
    total_bytes: int
    chunk_bytes: int
    num_chunks: int
    model_hash: str
    def __init__(self, round: _Optional[int] = ..., spec_json: _Optional[str] = ..., total_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., num_chunks: _Optional[int] = ..., model_hash: _Optional[str] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "participant_id", "num_examples", "metrics", "total_bytes", "chunk_bytes", "num_chunks", "model_hash", "commitment", "sealed", "withdrawn_reason", "commitment_signature", "enclave_key_id", "enclave_signature", "secagg_masked", "app_sha256", "data_sha256", "refusal", "refusal_signature", "compression", "compression_block", "max_abs_error", "rel_l2_error")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_REASON_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ENCLAVE_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ENCLAVE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SECAGG_MASKED_FIELD_NUMBER: _ClassVar[int]
    APP_SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_SHA256_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_BLOCK_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    REL_L2_ERROR_FIELD_NUMBER: _ClassVar[int]
    round: int
    participant_id: str
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    total_bytes: int
    chunk_bytes: int
    num_chunks: int
    model_hash: str
    commitment: bytes
    sealed: bool
    withdrawn_reason: str
    commitment_signature: bytes
    enclave_key_id: str
    enclave_signature: bytes
    secagg_masked: bool
    app_sha256: str
    data_sha256: str
    refusal: bytes
    refusal_signature: bytes
    compression: str
    compression_block: int
    max_abs_error: float
    rel_l2_error: float
    def __init__(self, round: _Optional[int] = ..., participant_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., total_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., num_chunks: _Optional[int] = ..., model_hash: _Optional[str] = ..., commitment: _Optional[bytes] = ..., sealed: _Optional[bool] = ..., withdrawn_reason: _Optional[str] = ..., commitment_signature: _Optional[bytes] = ..., enclave_key_id: _Optional[str] = ..., enclave_signature: _Optional[bytes] = ..., secagg_masked: _Optional[bool] = ..., app_sha256: _Optional[str] = ..., data_sha256: _Optional[str] = ..., refusal: _Optional[bytes] = ..., refusal_signature: _Optional[bytes] = ..., compression: _Optional[str] = ..., compression_block: _Optional[int] = ..., max_abs_error: _Optional[float] = ..., rel_l2_error: _Optional[float] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ReceiptRequest(_message.Message):
    __slots__ = ("round", "wait_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    wait_ms: int
    def __init__(self, round: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("round", "ready", "included", "new_model_hash", "participants", "merkle_root", "merkle_proof", "enclave_receipt", "proof_index", "leaf_count", "session")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_FIELD_NUMBER: _ClassVar[int]
    NEW_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    MERKLE_ROOT_FIELD_NUMBER: _ClassVar[int]
    MERKLE_PROOF_FIELD_NUMBER: _ClassVar[int]
    ENCLAVE_RECEIPT_FIELD_NUMBER: _ClassVar[int]
    PROOF_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_COUNT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    round: int
    ready: bool
    included: bool
    new_model_hash: str
    participants: _containers.RepeatedScalarFieldContainer[str]
    merkle_root: bytes
    merkle_proof: _containers.RepeatedScalarFieldContainer[bytes]
    enclave_receipt: bytes
    proof_index: int
    leaf_count: int
    session: str
    def __init__(self, round: _Optional[int] = ..., ready: _Optional[bool] = ..., included: _Optional[bool] = ..., new_model_hash: _Optional[str] = ..., participants: _Optional[_Iterable[str]] = ..., merkle_root: _Optional[bytes] = ..., merkle_proof: _Optional[_Iterable[bytes]] = ..., enclave_receipt: _Optional[bytes] = ..., proof_index: _Optional[int] = ..., leaf_count: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class SecAggKeys(_message.Message):
    __slots__ = ("round", "participant_id", "index", "cipher_pk", "mask_pk", "session", "model_hash")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PK_FIELD_NUMBER: _ClassVar[int]
    MASK_PK_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    round: int
    participant_id: str
    index: int
    cipher_pk: bytes
    mask_pk: bytes
    session: str
    model_hash: str
    def __init__(self, round: _Optional[int] = ..., participant_id: _Optional[str] = ..., index: _Optional[int] = ..., cipher_pk: _Optional[bytes] = ..., mask_pk: _Optional[bytes] = ..., session: _Optional[str] = ..., model_hash: _Optional[str] = ...) -> None: ...

class SecAggSurvivors(_message.Message):
    __slots__ = ("round", "participant_id", "session", "survivors")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    round: int
    participant_id: str
    session: str
    survivors: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round: _Optional[int] = ..., participant_id: _Optional[str] = ..., session: _Optional[str] = ..., survivors: _Optional[_Iterable[int]] = ...) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("round", "step", "wait_ms", "keys", "shares", "self_mask_shares", "key_shares", "survivors_signed")
    class SharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    class SelfMaskSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    class KeySharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_SIGNED_FIELD_NUMBER: _ClassVar[int]
    round: int
    step: SecAggStep
    wait_ms: int
    keys: SignedMessage
    shares: _containers.ScalarMap[int, bytes]
    self_mask_shares: _containers.ScalarMap[int, bytes]
    key_shares: _containers.ScalarMap[int, bytes]
    survivors_signed: SignedMessage
    def __init__(self, round: _Optional[int] = ..., step: _Optional[_Union[SecAggStep, str]] = ..., wait_ms: _Optional[int] = ..., keys: _Optional[_Union[SignedMessage, _Mapping]] = ..., shares: _Optional[_Mapping[int, bytes]] = ..., self_mask_shares: _Optional[_Mapping[int, bytes]] = ..., key_shares: _Optional[_Mapping[int, bytes]] = ..., survivors_signed: _Optional[_Union[SignedMessage, _Mapping]] = ...) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("round", "step", "ready", "roster", "inbox", "survivors", "session", "consistency")
    class InboxEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    INBOX_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    round: int
    step: SecAggStep
    ready: bool
    roster: _containers.RepeatedCompositeFieldContainer[SignedMessage]
    inbox: _containers.ScalarMap[int, bytes]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    session: str
    consistency: _containers.RepeatedCompositeFieldContainer[SignedMessage]
    def __init__(self, round: _Optional[int] = ..., step: _Optional[_Union[SecAggStep, str]] = ..., ready: _Optional[bool] = ..., roster: _Optional[_Iterable[_Union[SignedMessage, _Mapping]]] = ..., inbox: _Optional[_Mapping[int, bytes]] = ..., survivors: _Optional[_Iterable[int]] = ..., session: _Optional[str] = ..., consistency: _Optional[_Iterable[_Union[SignedMessage, _Mapping]]] = ...) -> None: ...
