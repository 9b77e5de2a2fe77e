"""The trusted ledger: identities, behaviour records and round commitments on an EVM, plus the
signed hash-chained audit log and its independent verifier.

Public API (import from the submodules; this package import stays light so that the config can
use :class:`~trustfed.ledger.settings.LedgerSettings` without loading web3):

* :mod:`trustfed.ledger.backends`: ``LedgerBackend``, ``EmbeddedLedger``, ``JsonRpcLedger``, ``open_backend``
* :mod:`trustfed.ledger.audit`: ``AuditLog``, ``Signer``, ``EcdsaSigner``
* :mod:`trustfed.ledger.recorder`: ``LedgerRecorder`` (a coordinator ``RoundObserver``)
* :mod:`trustfed.ledger.participant`: ``sign_commitment``, ``check_model``, ``check_inclusion``
* :mod:`trustfed.ledger.verify`: ``verify_run``
"""
