"""Worker tests: the shared end-to-end fixtures. The database outage tests bring their own
Postgres cluster and worker processes (test_database_outage.py)."""

from tests.e2e import api, e2e_redis, export_dir, rules_critic  # noqa: F401
from tests.jobs.test_labeling_e2e import corpus  # noqa: F401
