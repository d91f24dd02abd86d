"""The process: composition root, worker pools, TLS, listeners, control socket."""
