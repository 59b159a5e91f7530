"""Check modules, one per area; importing this package registers them all."""
from . import basics  # noqa: F401
from . import samplers_diffusion  # noqa: F401
from . import samplers_flow  # noqa: F401
from . import training  # noqa: F401
from . import distill  # noqa: F401
from . import align  # noqa: F401
from . import guards  # noqa: F401
from . import trajectory  # noqa: F401
