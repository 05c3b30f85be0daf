"""Process server: HTTPS ingest, bounded disk cache and the upload pipeline to the repository."""
