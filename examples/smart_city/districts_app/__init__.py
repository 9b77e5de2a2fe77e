"""City districts forecast tomorrow's electricity demand together without pooling their meter data."""
