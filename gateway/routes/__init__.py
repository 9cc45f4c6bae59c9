"""HTTP surfaces, one module each: ``openai`` (data plane), ``control`` (health)."""
