rule fit_aligners:
    """One method at one layer choice over the whole (n_pairs x seeds) grid: one job fits
    every run (cheap on CPU), each run saved with its own completion marker."""
    input:
        unpack(align_inputs),
    output:
        "results/aligners/{vision}/{text}/{method}/{choice}/runs.json",
    params:
        spec=align_spec,
        stores=lambda wildcards, input: json.dumps(
            {role: store_of(input[role]) for role in STORE_ROLES}
        ),
        train=f"{dataset_dir(TRAIN['dataset'])} {TRAIN['split']}",
        val=f"{dataset_dir(VAL['dataset'])} {VAL['split']}",
        out=lambda wildcards, output: os.path.dirname(output[0]),
    conda:
        "../envs/postalign.yaml"
    log:
        "results/logs/align/{vision}/{text}/{method}/{choice}.log",
    benchmark:
        "results/benchmarks/align/{vision}/{text}/{method}/{choice}.tsv"
    threads: config["align"]["threads"]
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        "python -m pipeline align --spec {params.spec:q} --method {wildcards.method}"
        " --layer-choice {wildcards.choice} --layers {input.layers} --stores {params.stores:q}"
        " --train {params.train} --val {params.val} --out {params.out} > {log} 2>&1"


rule align:
    """Target: every method x layer choice x n_pairs x seed of every encoder pair."""
    input:
        aligner_targets(),
