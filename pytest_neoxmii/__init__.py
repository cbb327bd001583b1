"""pytest-neoxmii: acceptance testing of GPT-NeoX / Pythia models served through DeepSpeed(-MII)
against the Hugging Face transformers reference."""

__version__ = "0.1.0"
__all__ = ["assert_matches_reference"]


def __getattr__(name: str):
    # Lazy: importing the package (pytest does, for the plugin) must not import torch.
    if name == "assert_matches_reference":
        from pytest_neoxmii.assertions import assert_matches_reference
        return assert_matches_reference
    raise AttributeError(f"module 'pytest_neoxmii' has no attribute {name!r}")
