"""A read-only web dashboard over run folders: progress, accuracy, the ledger's accounts, privacy spend,
and the independent audit on demand (``trustfed dashboard RUNS``)."""
