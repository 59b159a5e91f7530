"""Check modules, each named after the library code it checks; importing this package registers them all.

The import order is the registration order (and so the order of ``dstar-edu verify`` and ``list``).
"""
from . import process  # noqa: F401            process.py, conversions.py (ids basics.*)
from . import samplers_diffusion  # noqa: F401 samplers/diffusion.py, samplers/common.py
from . import samplers_flow  # noqa: F401      samplers/flow.py, samplers/consistency.py
from . import pretrain  # noqa: F401           objectives/pretrain.py (ids training.*)
from . import distill  # noqa: F401            objectives/distill.py, objectives/divergences.py
from . import alignment  # noqa: F401          objectives/alignment.py, preference.py, reward_finetune.py (ids align.*)
from . import guards  # noqa: F401             single formulas across modules that only unit tests guarded before
from . import trajectory  # noqa: F401         objectives/trajectory.py, samplers/parallel.py
