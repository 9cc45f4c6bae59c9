"""Small real HTTP servers for tests: fault-injecting upstreams and the vLLM simulator."""
