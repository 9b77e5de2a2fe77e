// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title Incentives: reputation, reward balances, stake and slashing per participant id.
/// @notice Amounts are in the federation's own accounting unit (not ether). Only the admin
/// (the federation's incentive authority) changes them; every change emits an event.
contract Incentives {
    address public admin;
    mapping(bytes32 => int256) private reputation; // keccak256(id) =>
    mapping(bytes32 => uint256) private balance;
    mapping(bytes32 => uint256) private stake;

    event ReputationChanged(string id, uint64 indexed round, int256 delta, int256 newValue);
    event Rewarded(string id, uint64 indexed round, uint256 amount, uint256 newBalance);
    event Staked(string id, uint256 amount, uint256 newStake);
    event Unstaked(string id, uint256 amount, uint256 newStake);
    event Slashed(string id, uint64 indexed round, uint256 amount, uint256 newStake, string reason);

    error NotAdmin(address caller);
    error LengthMismatch();
    error InsufficientStake(bytes32 idHash, uint256 have, uint256 want);

    modifier onlyAdmin() {
        if (msg.sender != admin) revert NotAdmin(msg.sender);
        _;
    }

    constructor() {
        admin = msg.sender;
    }

    /// Apply a round's reputation deltas and rewards in one transaction.
    function applyRound(uint64 round, string[] calldata ids, int256[] calldata deltas, uint256[] calldata rewards)
        external
        onlyAdmin
    {
        if (ids.length != deltas.length || ids.length != rewards.length) revert LengthMismatch();
        for (uint256 i = 0; i < ids.length; i++) {
            bytes32 k = keccak256(bytes(ids[i]));
            if (deltas[i] != 0) {
                reputation[k] += deltas[i];
                emit ReputationChanged(ids[i], round, deltas[i], reputation[k]);
            }
            if (rewards[i] != 0) {
                balance[k] += rewards[i];
                emit Rewarded(ids[i], round, rewards[i], balance[k]);
            }
        }
    }

    function addStake(string calldata id, uint256 amount) external onlyAdmin {
        bytes32 k = keccak256(bytes(id));
        stake[k] += amount;
        emit Staked(id, amount, stake[k]);
    }

    function withdrawStake(string calldata id, uint256 amount) external onlyAdmin {
        bytes32 k = keccak256(bytes(id));
        if (stake[k] < amount) revert InsufficientStake(k, stake[k], amount);
        stake[k] -= amount;
        emit Unstaked(id, amount, stake[k]);
    }

    function slash(string calldata id, uint64 round, uint256 amount, string calldata reason) external onlyAdmin {
        bytes32 k = keccak256(bytes(id));
        if (stake[k] < amount) revert InsufficientStake(k, stake[k], amount);
        stake[k] -= amount;
        emit Slashed(id, round, amount, stake[k], reason);
    }

    function accountOf(string calldata id) external view returns (int256 rep, uint256 bal, uint256 staked) {
        bytes32 k = keccak256(bytes(id));
        return (reputation[k], balance[k], stake[k]);
    }
}
