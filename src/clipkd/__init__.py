"""clipkd: distill large CLIP teachers into small, fast students, and prove what they keep.

Data flows one way through the sub-packages:
``data`` → ``teachers`` → ``store`` → ``students``/``training`` → ``evaluation``.
"""

__version__ = "0.1.0"

from .errors import ClipkdError

__all__ = ["ClipkdError", "__version__"]
