"""Model lifecycle: atomic pool reloads with rollback, and reloads of the whole config file.

A reload is blue-green. For every pool it changes, a new ``PoolRuntime`` is built beside
the running one: its managed replicas are launched (on a free port when the configured
one is still held by the set being replaced), and it must pass two gates -- every replica
healthy by its engine's own probe, and a one-token warm-up request for the pool's model
answered -- within ``reload_timeout_s``. Only then is routing switched, for all changed
pools at once and without an await in between, so each request sees either the old pool
or the new one. Requests already queued or running on the old set finish there; then the
old set is stopped ("retired"). Any failure before the switch stops the new set and leaves
the old one exactly as it was, serving throughout: no user request fails.

Before anything starts, replicas that name a ``gpu_device`` and a ``model_path`` are
checked against the GPU's free VRAM (``policies.fit``); a set that cannot fit is refused
with the breakdown. Pools reserved through ``policies.reservation`` are reloaded only with
the holder's token. Each outcome is sent to the webhooks (``swap_complete`` /
``swap_failed``) in the background.
"""

from gateway.lifecycle.manager import Lifecycle, ReloadRequest

__all__ = ["Lifecycle", "ReloadRequest"]
