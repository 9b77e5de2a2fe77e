"""Built-in federation apps: trustfed's own datasets and models on the same seam as a user's app."""
