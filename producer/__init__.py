"""Enqueue spam classifications from any app: a torch-free client, CLI and the message contract."""

from producer.client import SpamClient, make_app
from producer.contract import CLASSIFY, CLASSIFY_BATCH, ClassificationFailed, InvalidInput, ModelUnavailable

__all__ = [
    "CLASSIFY", "CLASSIFY_BATCH", "ClassificationFailed", "InvalidInput", "ModelUnavailable", "SpamClient", "make_app",
]
