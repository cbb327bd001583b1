"""Loaded by every Python process the plugin's deployments start (workers, DeepSpeed launcher, MII servers):
arms the GPT-NeoX compatibility patch before transformers is imported there, and keeps transformers from
importing what no engine uses (lean_imports.py)."""
try:
    from pytest_neoxmii import compat as _neoxmii_compat
    from pytest_neoxmii import lean_imports as _neoxmii_lean_imports
    _neoxmii_compat.install()
    _neoxmii_lean_imports.install()
except Exception:  # never break a process over a missing patch: injection verification reports it
    pass
