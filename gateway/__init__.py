"""orchgate: an OpenAI-compatible gateway and task orchestrator for one host's accelerators.

``gateway`` holds the HTTP surfaces and the wiring; it may import ``policies`` and
``backends``.
"""

__version__ = "0.1.0"
