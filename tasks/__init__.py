"""Celery tasks. Thin: validate the payload, look the model up, score, return JSON."""
