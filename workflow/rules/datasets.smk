rule prepare_dataset:
    """Materialise a dataset: manifests, captions, zero-shot tasks and prompts (and, for the
    synthetic world, its images and masks). manifest.json is written last. The source files
    are inputs (tracked, not passed: the stage lists them itself)."""
    input:
        unpack(inputs_of(jobs.prepare_dataset)),
    output:
        manifest=layout.dataset_manifest("{dataset}"),
    params:
        spec=spec_of(jobs.prepare_dataset),
        outputs=lambda wildcards, output: cli_paths(output),
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("prepare_dataset", "{dataset}"),
    benchmark:
        layout.benchmark("prepare_dataset", "{dataset}")
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "python -m pipeline prepare_dataset --spec {params.spec:q} --out {params.outputs}"
        " --threads {threads} > {log} 2>&1"
