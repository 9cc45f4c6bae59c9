"""Several gateways on one Redis/Valkey: imported only when the config has ``[cluster]``.

Without that section the gateway is one process and this package -- and the Redis client
with it -- is never imported (``tests/test_cluster_standby.py`` checks it). ``standby``
mode: one leader, elected through a lease with a fencing epoch (``lease``), serves; the
other nodes answer 503 and a ``/ready`` that load balancers route by (``standby``).
"""
