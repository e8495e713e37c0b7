rule extract_features:
    """Pool every layer of one encoder over one dataset split into a Zarr store. The declared
    output is the completion marker, so a killed job's finished blocks survive and resume.
    With runtime.extract_shards > 1 the shard jobs below write the blocks and this job only
    completes the store (one thread, no GPU)."""
    input:
        unpack(inputs_of(jobs.extract_features)),
    output:
        marker=layout.feature_marker("{dataset}", "{split}", "{encoder}"),
    params:
        spec=spec_of(jobs.extract_features),
        inputs=lambda wildcards, input: cli_paths(input),
        outputs=lambda wildcards, output: cli_paths(output),
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("extract_features", "{dataset}", "{split}", "{encoder}"),
    benchmark:
        layout.benchmark("extract_features", "{dataset}", "{split}", "{encoder}")
    threads: threads_of(jobs.extract_features)
    resources:
        gpu=gpu_unless_sharded,
        mem_mb=8000,
        runtime=240,
    shell:
        "python -m pipeline extract_features --spec {params.spec:q} --in {params.inputs}"
        " --out {params.outputs} --threads {threads} > {log} 2>&1"


rule extract_features_shard:
    """One of runtime.extract_shards jobs writing disjoint runs of blocks of one feature store
    (a killed shard resumes alone); extract_features completes the store after all of them."""
    input:
        unpack(inputs_of(jobs.extract_features_shard)),
    output:
        shard=layout.feature_shard_marker("{dataset}", "{split}", "{encoder}", "{shard}"),
    params:
        spec=spec_of(jobs.extract_features_shard),
        inputs=lambda wildcards, input: cli_paths(input),
        outputs=lambda wildcards, output: cli_paths(output),
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("extract_features_shard", "{dataset}", "{split}", "{encoder}", "{shard}"),
    benchmark:
        layout.benchmark("extract_features_shard", "{dataset}", "{split}", "{encoder}", "{shard}")
    threads: jobs.extract_threads(config)
    resources:
        gpu=wants_gpu(config["runtime"]["device"]),
        mem_mb=8000,
        runtime=240,
    shell:
        "python -m pipeline extract_features_shard --spec {params.spec:q} --in {params.inputs}"
        " --out {params.outputs} --threads {threads} > {log} 2>&1"


rule extract:
    """Target: every feature store of the experiment."""
    input:
        jobs.feature_markers(config),
