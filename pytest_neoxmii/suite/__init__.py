"""The acceptance suite, shipped in the package so that an installed plugin runs it from any directory:

    pytest --pyargs pytest_neoxmii.suite --neox-model=pythia-160m --neox-weights=synthetic

The repository's tests/acceptance collects these same modules (see tests/conftest.py)."""
