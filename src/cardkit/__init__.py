"""cardkit: compact, accurate and robust deep networks."""

__version__ = "0.1.0"
