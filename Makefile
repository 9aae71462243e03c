# Switchyard developer commands. The logic lives in scripts/; this file only wires it up.
#   make run    the whole system locally (web, Celery worker and beat, demo data)
#   make test   the whole test suite against real PostgreSQL and Redis

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
# The slowest tests are listed after every run, to keep the suite's time in sight.
PYTEST_ARGS ?= --durations=25 --durations-min=5

.PHONY: venv run test lint migrate seed worker beat bench loadtest clean distclean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when requirements.txt changed since the last install.
$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

run: venv
	$(PY) scripts/run.py

test: venv
	$(PY) scripts/test.py $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

migrate: venv
	$(PY) scripts/with_services.py -- $(PY) manage.py migrate --noinput

seed: migrate
	$(PY) scripts/with_services.py -- $(PY) manage.py seed_demo
	$(PY) scripts/with_services.py -- $(PY) manage.py billing_credit demo-ai-lab 500.00 "demo credit" --key demo-credit

worker: venv
	$(PY) scripts/with_services.py --stripe -- $(VENV)/bin/celery -A config worker -l info -Q provisioning,billing,webhooks,telemetry,default

beat: venv
	$(PY) scripts/with_services.py -- $(VENV)/bin/celery -A config beat -l info -s .run/celerybeat-schedule

bench: venv
	$(PY) scripts/bench.py

# A locust load test against gunicorn on loopback, with checks afterwards (docs/benchmarks.md).
loadtest: venv
	$(PY) scripts/loadtest.py $(LOADTEST_ARGS)

clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache staticfiles test-results .run/logs

# Also removes the virtualenv and the demo data (embedded PostgreSQL and Redis under .run/).
distclean: clean
	rm -rf $(VENV) .run
