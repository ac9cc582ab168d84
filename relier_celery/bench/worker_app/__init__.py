"""The folder the benchmark's workers put first on their path to import ``bench_app`` as a
top-level module (``celery -A bench_app worker``).

Not as ``relier_celery.bench...``: a worker adds its task modules to ``include``, and a
submodule of relier_celery there enables relier (wiring/install.py), which the vanilla side
must not.
Nothing else lives in this folder, so that path shadows no other module.
"""
