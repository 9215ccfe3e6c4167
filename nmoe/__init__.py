"""What every nmoe package shares and nothing else: the error hierarchy (``nmoe.errors``).

It imports nothing of the project, so the learning code (nmoe_models), the network (broker), the
endpoints (agents) and the runner (scenarios) can all use it without depending on each other.
"""
