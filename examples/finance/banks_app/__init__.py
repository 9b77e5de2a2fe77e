"""Banks train one credit-risk model together without sharing their customers' records."""
