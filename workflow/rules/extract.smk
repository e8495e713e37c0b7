rule extract_features:
    """Pool every layer of one encoder over one dataset split into a Zarr store. The declared
    output is the completion marker, so a killed job's finished blocks survive and resume."""
    input:
        "results/datasets/{dataset}/manifest.json",
    output:
        "results/features/{dataset}/{split}/{encoder}.zarr.done",
    params:
        spec=extract_spec,
        store=lambda wildcards: feature_store(
            wildcards.dataset, wildcards.split, wildcards.encoder
        ),
        dataset_dir=lambda wildcards: dataset_dir(wildcards.dataset),
    conda:
        "../envs/postalign.yaml"
    log:
        "results/logs/extract/{dataset}/{split}/{encoder}.log",
    benchmark:
        "results/benchmarks/extract/{dataset}/{split}/{encoder}.tsv"
    threads: 2
    resources:
        gpu=wants_gpu(config["runtime"]["device"]),
        mem_mb=8000,
        runtime=240,
    shell:
        "python -m pipeline extract --encoder {wildcards.encoder} --spec {params.spec:q}"
        " --dataset-dir {params.dataset_dir} --split {wildcards.split}"
        " --out {params.store} > {log} 2>&1"


rule extract:
    """Target: every feature store of the experiment."""
    input:
        feature_targets(),
