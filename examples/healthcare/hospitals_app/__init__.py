"""Hospitals detect malignant breast tumours together without pooling patients' records."""
