"""A model's life in a worker process: the start-up hooks, the registry of what serves, versions, reloads."""
