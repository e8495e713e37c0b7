rule pretrain_encoder:
    """Self-supervised weights for a timm encoder with a `pretrain` block: SimCLR on an unpaired
    split of a synthetic world, no captions, no labels (docs/pretrain.md). Extraction loads them
    through the encoder's local `weights` path, as it would a user's own checkpoint."""
    input:
        unpack(inputs_of(jobs.pretrain_encoder)),
    output:
        weights=layout.pretrained_weights("{encoder}"),
        record=layout.pretrain_record("{encoder}"),
    params:
        spec=spec_of(jobs.pretrain_encoder),
        inputs=lambda wildcards, input: cli_paths(input),
        outputs=lambda wildcards, output: cli_paths(output),
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("pretrain_encoder", "{encoder}"),
    benchmark:
        layout.benchmark("pretrain_encoder", "{encoder}")
    threads: jobs.PRETRAIN_THREADS
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m pipeline pretrain_encoder --spec {params.spec:q} --in {params.inputs}"
        " --out {params.outputs}"
        " --threads {threads} > {log} 2>&1"


rule pretrain:
    """Target: the self-supervised weights of every encoder with a `pretrain` block."""
    input:
        [layout.pretrained_weights(name) for name in jobs.pretrained_encoders(config)],
