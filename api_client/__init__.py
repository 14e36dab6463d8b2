"""Producer side of segq: the client, S3-event ingestion and the `segq` CLI."""
