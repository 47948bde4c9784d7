"""(being written)"""

__all__ = []
REGISTRY = {}
