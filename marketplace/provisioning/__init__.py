"""Provisioning: the reservation lifecycle through a driver, the site-agent job queue, outages.

- drivers.py: the Driver interface and the simulated and site-agent drivers.
- services.py: the provision and release steps the Celery tasks run, node failures, outages.
- scheduler.py: the dispatcher and the sweeper (what is due, what is stuck).
- kicks.py: enqueueing a provision or release after commit, by task name (a leaf).
- agent_jobs.py: the job queue site agents lease from; apis.py/urls.py expose it.
- workload.py: validation of the workload spec and its public (secret-free) form.
"""
