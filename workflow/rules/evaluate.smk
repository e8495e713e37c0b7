rule evaluate_aligners:
    """Zero-shot classification and retrieval of every run of one align job."""
    input:
        unpack(evaluate_inputs),
    output:
        "results/evaluation/{vision}/{text}/{method}/{choice}.parquet",
    params:
        spec=evaluate_spec,
        aligners=lambda wildcards, input: os.path.dirname(input.runs),
    conda:
        "../envs/postalign.yaml"
    log:
        "results/logs/evaluate/{vision}/{text}/{method}/{choice}.log",
    benchmark:
        "results/benchmarks/evaluate/{vision}/{text}/{method}/{choice}.tsv"
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m pipeline evaluate --spec {params.spec:q} --aligners {params.aligners}"
        " --out {output} > {log} 2>&1"


rule aggregate:
    """One metrics table, its summary over seeds, and the plots drawn from them."""
    input:
        evaluations=evaluation_targets(),
        similarities=[
            f"results/similarity/{p['vision']}/{p['text']}/similarity.parquet" for p in PAIRS
        ],
    output:
        metrics=report(
            "results/tables/metrics.parquet",
            category="Tables",
            caption="../report/metrics.rst",
        ),
        summary=report(
            "results/tables/summary.parquet",
            category="Tables",
            caption="../report/summary.rst",
        ),
        plots=report(
            directory("results/plots"),
            patterns=["{name}.png"],
            category="Results",
            caption="../report/plots.rst",
        ),
    conda:
        "../envs/postalign.yaml"
    log:
        "results/logs/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m pipeline aggregate --evaluations {input.evaluations}"
        " --similarities {input.similarities} --tables results/tables"
        " --plots {output.plots} > {log} 2>&1"


rule evaluate:
    """Target: every run evaluated on every task."""
    input:
        evaluation_targets(),


rule report:
    """Target: everything the HTML report shows (render it with `snakemake --report`)."""
    input:
        rules.aggregate.output,
        rules.similarity.input,
