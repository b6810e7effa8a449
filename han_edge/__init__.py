"""han-edge: HAN person re-id from training to TensorRT engines on Jetson and data-centre GPUs.

The runtime API (``Embedder``, ``Gallery``) imports without PyTorch, as on a Jetson.
"""
from han_edge.config import HANConfig, get_config, VARIANTS
from han_edge.errors import HanEdgeError, MissingDependencyError

from han_edge._version import __version__

__all__ = ["HANConfig", "get_config", "VARIANTS", "HanEdgeError", "MissingDependencyError",
           "Embedder", "Gallery", "__version__"]


def __getattr__(name):
    # Lazy so that `import han_edge` stays cheap and torch-free.
    if name == "Embedder":
        from han_edge.runtime import Embedder
        return Embedder
    if name == "Gallery":
        from han_edge.gallery import Gallery
        return Gallery
    raise AttributeError(name)
