"""slimlm: run and fine-tune LLMs inside the memory you actually have."""

from slimlm.errors import SlimlmError

__version__ = "0.1.0"
__all__ = ["SlimlmError", "__version__"]
