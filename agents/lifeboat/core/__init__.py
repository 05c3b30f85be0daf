"""Formats, crypto, compression, config, errors, logging and metrics shared by every daemon."""
