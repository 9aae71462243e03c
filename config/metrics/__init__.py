"""Prometheus metrics.

- HTTP requests, latency by view and status, database and cache: django-prometheus's
  middleware and database backend, and the instrumented cache in `cache.py`.
- Celery tasks by name and outcome, with their run time: `tasks.py`, in every worker process.
- The business, read from PostgreSQL and Redis when scraped: `business.py`.

Web processes serve them at GET /metrics (`views.py`); a Celery worker on
CELERY_METRICS_ADDRESS. Under gunicorn or Celery prefork, PROMETHEUS_MULTIPROC_DIR makes one
scrape sum every process.
"""
