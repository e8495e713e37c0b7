rule extract_tokens:
    """Every token of the layers chosen for one encoder (read from the layers.json of each pair
    it is in when the job runs; their union, so a shared layer is extracted once), one forward
    pass over one dataset split, one Zarr token store per layer. The declared output is the
    token set's marker, so a killed job's finished blocks survive and resume. With
    runtime.extract_shards > 1 the shard jobs below write the blocks and this job only
    completes the set (one thread, no GPU)."""
    input:
        unpack(inputs_of(jobs.extract_tokens)),
    output:
        tokens=layout.tokens_marker("{dataset}", "{split}", "{encoder}"),
    params:
        spec=spec_of(jobs.extract_tokens),
        inputs=lambda wildcards, input: cli_paths(input),
        outputs=lambda wildcards, output: cli_paths(output),
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("extract_tokens", "{dataset}", "{split}", "{encoder}"),
    benchmark:
        layout.benchmark("extract_tokens", "{dataset}", "{split}", "{encoder}")
    threads: threads_of(jobs.extract_tokens)
    resources:
        gpu=gpu_unless_sharded,
        mem_mb=8000,
        runtime=240,
    shell:
        "python -m pipeline extract_tokens --spec {params.spec:q} --in {params.inputs}"
        " --out {params.outputs} --threads {threads} > {log} 2>&1"


rule extract_tokens_shard:
    """One of runtime.extract_shards jobs writing disjoint runs of blocks of every chosen
    layer's token store (a killed shard resumes alone); extract_tokens completes the set."""
    input:
        unpack(inputs_of(jobs.extract_tokens_shard)),
    output:
        shard=layout.tokens_shard_marker("{dataset}", "{split}", "{encoder}", "{shard}"),
    params:
        spec=spec_of(jobs.extract_tokens_shard),
        inputs=lambda wildcards, input: cli_paths(input),
        outputs=lambda wildcards, output: cli_paths(output),
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("extract_tokens_shard", "{dataset}", "{split}", "{encoder}", "{shard}"),
    benchmark:
        layout.benchmark("extract_tokens_shard", "{dataset}", "{split}", "{encoder}", "{shard}")
    threads: jobs.extract_threads(config)
    resources:
        gpu=wants_gpu(config["runtime"]["device"]),
        mem_mb=8000,
        runtime=240,
    shell:
        "python -m pipeline extract_tokens_shard --spec {params.spec:q} --in {params.inputs}"
        " --out {params.outputs} --threads {threads} > {log} 2>&1"


rule tokens:
    """Target: every token set of the experiment (PAL, segmentation)."""
    input:
        jobs.token_markers(config),
