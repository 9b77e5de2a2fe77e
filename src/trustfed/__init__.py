"""trustfed: trusted federated learning and distributed training."""

__version__ = "0.1.0"

from trustfed.errors import ConfigError, TrustFedError

__all__ = ["ConfigError", "TrustFedError", "__version__"]
