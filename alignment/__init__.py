"""alignment: reward-model, preference and policy-gradient objectives in JAX.

Importing ``alignment`` is cheap: it imports nothing heavy. Import the
subpackage you need (``from alignment import losses``).
"""

__version__ = "0.1.0"
