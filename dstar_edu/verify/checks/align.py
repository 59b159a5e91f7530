"""Checks registered in this module (see dstar_edu/verify/registry.py)."""
