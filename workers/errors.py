"""Errors of the decoding engine that the ingress acts on, importable without torch."""


class EngineDeadError(RuntimeError):
    """The scheduler's loop stopped; the replica must be replaced (another replica can serve
    the request meanwhile)."""
