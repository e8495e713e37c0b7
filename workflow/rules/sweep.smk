rule sweep_layers:
    """The layer sweep of one encoder pair: the sweep method fitted on one training run at every
    (vision layer, text layer) pair and scored on the classification and retrieval tasks."""
    input:
        unpack(inputs_of(jobs.sweep_layers)),
    output:
        sweep=layout.sweep_table("{vision}", "{text}"),
    params:
        spec=spec_of(jobs.sweep_layers),
        inputs=lambda wildcards, input: cli_paths(input),
        outputs=lambda wildcards, output: cli_paths(output),
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("sweep_layers", "{vision}", "{text}"),
    benchmark:
        layout.benchmark("sweep_layers", "{vision}", "{text}")
    threads: config["align"]["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "python -m pipeline sweep_layers --spec {params.spec:q} --in {params.inputs}"
        " --out {params.outputs} --threads {threads} > {log} 2>&1"


rule sweep:
    """Target: the layer sweep of every encoder pair (nothing without a `sweep` section)."""
    input:
        jobs.sweep_tables(config),
