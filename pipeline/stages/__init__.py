"""One module per Snakemake rule, each with ``run(job: pipeline.jobs.Job) -> None``.

A stage module is the I/O edge of its rule: it reads the job's inputs, calls the domain code
(``data``, ``similarity``, ``align``, ``evaluate``, ...) and writes the job's outputs.
``pipeline.cli.run_stage`` imports ``pipeline.stages.<rule>`` only when the job runs, so
reading the workflow never imports torch.
"""
