"""clbench: a continual-learning benchmark framework.

Importing this package is cheap: torch, the data loaders, the strategies and
the loggers are imported only where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
