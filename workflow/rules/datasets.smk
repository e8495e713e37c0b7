rule prepare_dataset:
    """Materialise a dataset: manifests, captions, zero-shot tasks and prompts (and, for the
    synthetic world, its images and masks). manifest.json is written last."""
    output:
        "results/datasets/{dataset}/manifest.json",
    params:
        spec=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset], sort_keys=True),
        out=lambda wildcards: dataset_dir(wildcards.dataset),
    conda:
        "../envs/postalign.yaml"
    log:
        "results/logs/prepare_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/prepare_dataset/{dataset}.tsv"
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "python -m pipeline prepare-data --name {wildcards.dataset} --spec {params.spec:q}"
        " --out {params.out} > {log} 2>&1"
