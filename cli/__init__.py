"""The top floor: the ``atelier`` command line (:mod:`cli.main`) and ``make demo`` (:mod:`cli.demo`).

The only package that composes the others: it starts the Serve application (``serve_app``),
runs or submits the Ray jobs (``train_jobs``) and uses the ground floor (``cluster``) for
settings, the local head, the registry and the model catalog. Nothing imports it.
"""
