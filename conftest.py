"""Repository-level pytest configuration. The plugin itself is loaded through its pytest11 entry point
(pip install -e .); this file only enables pytester for the plugin's own unit tests and keeps pytest
out of the virtualenv and build folders."""

pytest_plugins = ["pytester"]
collect_ignore = [".venv", "build", ".whl"]
