"""One import for the scripts: everything of :mod:`scaled_runs.config` (settings, accelerator, seeds, prompts),
:mod:`scaled_runs.checkpoints` (EMA, checkpoints, rotation, RNG states, resume check) and
:mod:`scaled_runs.loop` (the training loop around ``dstar_edu.distillation.alternate``)."""
from __future__ import annotations

from scaled_runs.checkpoints import *  # noqa: F401,F403
from scaled_runs.checkpoints import __all__ as _ck
from scaled_runs.config import *  # noqa: F401,F403
from scaled_runs.config import __all__ as _cfg
from scaled_runs.loop import *  # noqa: F401,F403
from scaled_runs.loop import __all__ as _loop

__all__ = [*_cfg, *_ck, *_loop]
