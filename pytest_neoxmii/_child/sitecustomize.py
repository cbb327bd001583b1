"""Loaded by every Python process the plugin's deployments start (DeepSpeed launcher, MII servers):
arms the GPT-NeoX compatibility patch before transformers is imported there."""
try:
    from pytest_neoxmii import compat as _neoxmii_compat
    _neoxmii_compat.install()
except Exception:  # never break a process over a missing patch: injection verification reports it
    pass
