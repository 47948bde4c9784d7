"""Return and advantage estimators (the rlax ``multistep`` of LLM RL).

Group estimators take rewards with an explicit group axis ``[B, G]``.
"""

from alignment.advantages import _gae, _group, _process
from alignment.advantages._gae import *  # noqa: F403
from alignment.advantages._group import *  # noqa: F403
from alignment.advantages._process import *  # noqa: F403

REGISTRY = {**_gae.REGISTRY, **_group.REGISTRY, **_process.REGISTRY}
"""Advantage estimators by config name (``config.advantage.name``)."""
