"""The `lifeboat` operator command."""
