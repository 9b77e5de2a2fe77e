// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title ParticipantRegistry: who may take part in a trustfed federation.
/// @notice Each participant has an id, the SHA-256 fingerprint of its certificate or public key,
/// a role and a status. Only the federation admin may change an entry; every change emits an event.
contract ParticipantRegistry {
    enum Role { Participant, Coordinator, Enclave, Auditor }
    enum Status { None, Active, Suspended, Revoked, Exited }

    struct Entry {
        bytes32 fingerprint;
        Role role;
        Status status;
    }

    address public admin;
    mapping(bytes32 => Entry) private entries; // keccak256(id) => entry
    string[] private ids;

    event AdminChanged(address indexed previousAdmin, address indexed newAdmin);
    event ParticipantRegistered(string id, bytes32 fingerprint, Role role);
    event StatusChanged(string id, Status previousStatus, Status newStatus);
    event FingerprintChanged(string id, bytes32 previousFingerprint, bytes32 newFingerprint);

    error NotAdmin(address caller);
    // Errors carry keccak256(id), not the id string: clients decode them by selector.
    error AlreadyRegistered(bytes32 idHash);
    error UnknownParticipant(bytes32 idHash);
    error FinalStatus(bytes32 idHash, Status status);
    error BadStatus(Status status);
    error LengthMismatch();

    modifier onlyAdmin() {
        if (msg.sender != admin) revert NotAdmin(msg.sender);
        _;
    }

    constructor() {
        admin = msg.sender;
        emit AdminChanged(address(0), msg.sender);
    }

    function transferAdmin(address newAdmin) external onlyAdmin {
        emit AdminChanged(admin, newAdmin);
        admin = newAdmin;
    }

    /// Register many identities in one transaction (all active).
    function registerMany(string[] calldata newIds, bytes32[] calldata fingerprints, Role[] calldata roles)
        external
        onlyAdmin
    {
        if (newIds.length != fingerprints.length || newIds.length != roles.length) revert LengthMismatch();
        for (uint256 i = 0; i < newIds.length; i++) {
            _register(newIds[i], fingerprints[i], roles[i]);
        }
    }

    function register(string calldata id, bytes32 fingerprint, Role role) external onlyAdmin {
        _register(id, fingerprint, role);
    }

    function _register(string calldata id, bytes32 fingerprint, Role role) private {
        bytes32 k = keccak256(bytes(id));
        if (entries[k].status != Status.None) revert AlreadyRegistered(k);
        entries[k] = Entry(fingerprint, role, Status.Active);
        ids.push(id);
        emit ParticipantRegistered(id, fingerprint, role);
    }

    /// Suspended may return to Active; Revoked and Exited are final.
    function setStatus(string calldata id, Status status) external onlyAdmin {
        bytes32 k = keccak256(bytes(id));
        Entry storage e = entries[k];
        if (e.status == Status.None) revert UnknownParticipant(k);
        if (status == Status.None) revert BadStatus(status);
        if (e.status == Status.Revoked || e.status == Status.Exited) revert FinalStatus(k, e.status);
        emit StatusChanged(id, e.status, status);
        e.status = status;
    }

    /// A new certificate for the same participant (key rotation).
    function setFingerprint(string calldata id, bytes32 fingerprint) external onlyAdmin {
        bytes32 k = keccak256(bytes(id));
        Entry storage e = entries[k];
        if (e.status == Status.None) revert UnknownParticipant(k);
        if (e.status == Status.Revoked || e.status == Status.Exited) revert FinalStatus(k, e.status);
        emit FingerprintChanged(id, e.fingerprint, fingerprint);
        e.fingerprint = fingerprint;
    }

    function get(string calldata id) external view returns (bytes32 fingerprint, Role role, Status status) {
        Entry storage e = entries[keccak256(bytes(id))];
        return (e.fingerprint, e.role, e.status);
    }

    function count() external view returns (uint256) {
        return ids.length;
    }

    function idAt(uint256 index) external view returns (string memory) {
        return ids[index];
    }
}
