"""Domain errors. The CLI maps each family to a fixed exit code; pipelines turn item errors into rows."""


class GRefineError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(GRefineError, ValueError):
    """A bad preset, option or config file (exit code 2)."""


class ModelUnavailableError(GRefineError, RuntimeError):
    """Pretrained weights are not available locally and cannot be downloaded."""


class ImageError(GRefineError, ValueError):
    """An input image cannot be decoded or is refused (too large, empty, not an image)."""


class InputError(GRefineError, ValueError):
    """A data source is unusable as a whole (missing column, no files, unreadable shard)."""
