rule fit_aligners:
    """One method at one layer choice over the whole (n_pairs x seeds) grid: one job fits
    every run (cheap on CPU), each run saved with its own completion marker."""
    input:
        unpack(inputs_of(jobs.fit_aligners)),
    output:
        runs=layout.aligner_runs("{vision}", "{text}", "{method}", "{choice}"),
    params:
        spec=spec_of(jobs.fit_aligners),
        incomplete=incomplete_runs,
        inputs=lambda wildcards, input: cli_paths(input),
        outputs=lambda wildcards, output: cli_paths(output),
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("fit_aligners", "{vision}", "{text}", "{method}", "{choice}"),
    benchmark:
        layout.benchmark("fit_aligners", "{vision}", "{text}", "{method}", "{choice}")
    threads: config["align"]["threads"]
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        "python -m pipeline fit_aligners --spec {params.spec:q} --in {params.inputs}"
        " --out {params.outputs} --threads {threads} > {log} 2>&1"


rule align:
    """Target: every method x layer choice x n_pairs x seed of every encoder pair."""
    input:
        [layout.aligner_runs(*cell) for cell in jobs.grid_cells(config)],
