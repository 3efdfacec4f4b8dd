"""The operator's side: the Flower ServerApp that drives the fusion stages over the clients, its run settings,
and what it keeps on disk to resume a round.

    from mos.server import Settings, serve
"""

from mos.shared.runtime import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {"Settings": "mos.server.settings", "serve": "mos.server.operator"})
