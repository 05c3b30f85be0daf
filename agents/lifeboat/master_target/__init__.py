"""Master target: on-prem failback receiver (health and metrics only for now)."""
