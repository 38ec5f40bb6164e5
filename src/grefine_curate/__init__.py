"""grefine-curate: batch curation of AI-generated images with G-Refine (PQ-Map, AQ-Map, refiner)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("grefine-curate")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
