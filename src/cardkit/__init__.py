"""cardkit: compact, accurate and robust deep networks."""

__version__ = "0.1.0"
__all__ = ["load_artifact"]


def __getattr__(name):
    # torch is imported only when the loader is asked for, not by `import cardkit`.
    if name == "load_artifact":
        from cardkit.compress.artifact import load_artifact

        return load_artifact
    raise AttributeError(f"module 'cardkit' has no attribute {name!r}")
