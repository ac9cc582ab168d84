"""Integrations with other tools, each a module that imports its tool: ``contrib.pytest`` is the
pytest plugin (the ``relier`` ``pytest11`` entry point). Nothing here is imported by the core."""
