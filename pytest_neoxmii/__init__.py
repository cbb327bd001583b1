"""pytest-neoxmii: acceptance testing of GPT-NeoX / Pythia models served through DeepSpeed(-MII)
against the Hugging Face transformers reference."""

__version__ = "0.1.0"
