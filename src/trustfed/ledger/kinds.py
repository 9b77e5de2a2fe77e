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
BEHAVIOUR_KIND = "participant_behaviour"  # an update refused for what it carried: who, round, reason, by whom
