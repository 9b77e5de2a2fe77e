// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title RoundLog: one append-only commitment per federated round.
/// @notice Round 0 records the initial model. Each later round records the new global model hash,
/// the Merkle root of the participants' update commitments, the aggregation receipt hash (zero
/// without an enclave) and the head of the signed audit log. One transaction per round, whatever
/// the number of participants. Records can never be changed once written.
contract RoundLog {
    struct Record {
        bytes32 modelHash;
        bytes32 merkleRoot;
        bytes32 receiptHash;
        bytes32 logHead;
        uint32 numUpdates;
        uint64 blockNumber;
    }

    address public admin;
    mapping(address => bool) public writers;
    uint64 public nextRound;
    mapping(uint64 => Record) private records;

    event WriterChanged(address indexed writer, bool allowed);
    event RoundCommitted(
        uint64 indexed round,
        bytes32 modelHash,
        bytes32 merkleRoot,
        bytes32 receiptHash,
        bytes32 logHead,
        uint32 numUpdates,
        address writer
    );

    error NotAdmin(address caller);
    error NotWriter(address caller);
    error OutOfOrder(uint64 expected, uint64 got);
    error NoSuchRound(uint64 round);

    constructor() {
        admin = msg.sender;
        writers[msg.sender] = true;
        emit WriterChanged(msg.sender, true);
    }

    function setWriter(address writer, bool allowed) external {
        if (msg.sender != admin) revert NotAdmin(msg.sender);
        writers[writer] = allowed;
        emit WriterChanged(writer, allowed);
    }

    function commitRound(
        uint64 round,
        bytes32 modelHash,
        bytes32 merkleRoot,
        bytes32 receiptHash,
        bytes32 logHead,
        uint32 numUpdates
    ) external {
        if (!writers[msg.sender]) revert NotWriter(msg.sender);
        if (round != nextRound) revert OutOfOrder(nextRound, round);
        records[round] = Record(modelHash, merkleRoot, receiptHash, logHead, numUpdates, uint64(block.number));
        nextRound = round + 1;
        emit RoundCommitted(round, modelHash, merkleRoot, receiptHash, logHead, numUpdates, msg.sender);
    }

    function getRound(uint64 round) external view returns (Record memory) {
        if (round >= nextRound) revert NoSuchRound(round);
        return records[round];
    }
}
