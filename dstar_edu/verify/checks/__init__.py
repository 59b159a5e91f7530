"""Check modules, one per area; importing this package registers them all."""
from . import basics  # noqa: F401
