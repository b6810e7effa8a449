"""The one exception type han-edge raises for bad input; the CLI prints its message, not a traceback."""


class HanEdgeError(Exception):
    """A problem with the user's input or environment, worded to be shown as is."""


class MissingDependencyError(HanEdgeError):
    """An optional package (TensorRT, CuPy, PyTorch, ...) is needed but not installed."""
