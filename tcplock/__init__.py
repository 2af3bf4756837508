"""tcplock: a FIFO mutex (or N-slot semaphore) in front of any TCP service.

The public API is :class:`TCPLock` (a gevent ``StreamServer``) and the :class:`Connection` its
hooks receive. Names are imported on first use, so that ``import tcplock`` loads no gevent
module and ``python -m tcplock`` can monkey-patch before anything else is imported.
Importing tcplock never monkey-patches.
"""

__version__ = "0.1.0"

__all__ = ["TCPLock", "Connection", "HookFailed", "END_REASONS", "__version__"]

_LAZY = {
    "TCPLock": "server",
    "Connection": "server",
    "END_REASONS": "server",
    "HookFailed": "hooks",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tcplock' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
