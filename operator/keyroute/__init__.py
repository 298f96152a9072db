"""keyroute: LLM credential routing for Kubernetes.

The package is split in two layers (written down in ``pyproject.toml`` for import-linter):

- ``keyroute.core``: pure models and decisions (resources, classification, pool and chain state
  machines, rendering). No I/O, time is a parameter.
- shells: ``keyroute.sidecar`` (HTTP proxy), ``keyroute.cli``, ``keyroute.demo`` and the fake
  provider used by the demo, the tests and the benchmarks. They read, call the core, apply.
"""

__version__ = "0.1.0"
