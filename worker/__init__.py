"""segq workers: Celery app and tasks around plain-Python segmentation pipelines."""
