"""The quantization and evaluation engine: paths and core's typed inputs in, core's typed result out.

No Celery, SQLAlchemy or FastAPI in here; it imports only `core` and itself, and is runnable and testable
on its own. `run_job` is the whole of one job."""
