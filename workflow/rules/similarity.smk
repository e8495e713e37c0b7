rule compare_layers:
    """Similarity of every (vision layer, text layer) pair on training pairs, heatmaps, and
    the layer choice (last, best, quantiles) each aligner run uses."""
    input:
        vision=train_marker("{vision}"),
        text=train_marker("{text}"),
        dataset=f"results/datasets/{TRAIN['dataset']}/manifest.json",
    output:
        table="results/similarity/{vision}/{text}/similarity.parquet",
        layers="results/similarity/{vision}/{text}/layers.json",
        heatmaps=report(
            expand(
                "results/similarity/{{vision}}/{{text}}/heatmaps/{metric}.png",
                metric=config["similarity"]["metrics"],
            ),
            category="Layer similarity",
            subcategory="{vision} x {text}",
            caption="../report/similarity.rst",
        ),
    params:
        spec=similarity_spec,
        vision_store=lambda wildcards, input: store_of(input.vision),
        text_store=lambda wildcards, input: store_of(input.text),
        train_dir=lambda wildcards, input: os.path.dirname(input.dataset),
        train_split=TRAIN["split"],
        out=lambda wildcards, output: os.path.dirname(output.table),
    conda:
        "../envs/postalign.yaml"
    log:
        "results/logs/similarity/{vision}/{text}.log",
    benchmark:
        "results/benchmarks/similarity/{vision}/{text}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "python -m pipeline similarity --spec {params.spec:q}"
        " --vision-store {params.vision_store} --text-store {params.text_store}"
        " --train-dir {params.train_dir} --train-split {params.train_split}"
        " --out {params.out} > {log} 2>&1"


rule similarity:
    """Target: every encoder pair's similarity table, heatmaps and layer choice."""
    input:
        [f"results/similarity/{p['vision']}/{p['text']}/layers.json" for p in PAIRS],
