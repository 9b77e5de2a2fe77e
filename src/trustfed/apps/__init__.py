"""Built-in federation apps and the runtime that hosts any app: trustfed's own datasets and models on the
same seam as a user's app (:mod:`trustfed.apps.builtin`), and :class:`~trustfed.apps.runtime.Runtime`, the one
assembly of an app and its config that simulate, server, client and the enclave runs build from."""
