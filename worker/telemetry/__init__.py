"""What a worker process reports: load, memory and task figures for Flower, and the Prometheus endpoint."""
