"""The kinds of the coordinator-signed audit entries a recorded run attaches to its rounds.

The recorders write them and ``trustfed audit verify`` reads them; the participants' own
commitments are :data:`trustfed.ledger.participant.COMMITMENT_KIND`.
"""

PRIVACY_KIND = "privacy_spend"
INCENTIVES_KIND = "incentives"
STAKE_KIND = "incentives_stake"
ATTESTATION_KIND = "enclave_attestation"
RECEIPT_KIND = "enclave_receipt"
STATUS_KIND = "participant_status"
APP_KIND = "app"
LEDGER_KIND = "ledger_account"  # round 0: the chain, its contracts and the account that signs every write
REFUSAL_KIND = "refusal"  # signed by a participant: it refused the model it was served in a round
BEHAVIOUR_KIND = "participant_behaviour"  # an update refused for what it carried: who, round, reason, by whom
