"""GPU Celery workers that classify Korean messages as spam or ham with preloaded models."""

from worker.celery import app, settings

__all__ = ["app", "settings"]
