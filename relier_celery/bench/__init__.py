"""Benchmarks that ship with the package: relier against vanilla Celery in the same run, on a
throwaway Redis, with real ``celery worker`` processes of the bundled app
(``worker_app/bench_app.py``) and real signals. ``rl bench all`` runs them
(docs/cli.md); ``benchmarks/`` in the repository builds on the same pieces.

A benchmark, not a test: it reports figures and fails only when it cannot measure, or when its
vanilla side turns out to have run relier.

Nothing is imported here: the benchmark's workers import ``bench_app`` from below this folder, and
the vanilla ones should load no more of relier than Celery's CLI already does.
"""
