"""Lifeboat: continuous block-level replication of Linux machines to Azure Blob Storage."""

__version__ = "0.1.0"
