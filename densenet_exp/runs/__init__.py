"""Runs in MLflow and on disk: the store, a job's run (facts, close_run), a sweep's parent run
and folder, ownership, claims, checkpoints, clean stops, logs and the console. Imports only the
package's base modules (config, record, checks, validate, ...)."""
