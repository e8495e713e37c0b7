rule compare_layers:
    """Similarity of every (vision layer, text layer) pair on training pairs, heatmaps, and
    the layer choice (last, best, quantiles) each aligner run uses."""
    input:
        unpack(inputs_of(jobs.compare_layers)),
    output:
        table=layout.similarity_table("{vision}", "{text}"),
        layers=layout.layers_json("{vision}", "{text}"),
        heatmaps=report(
            [layout.heatmap("{vision}", "{text}", m) for m in config["similarity"]["metrics"]],
            category="Layer similarity",
            subcategory="{vision} x {text}",
            caption="../report/similarity.rst",
        ),
        by_pool_size=layout.pool_size_plot("{vision}", "{text}"),
    params:
        spec=spec_of(jobs.compare_layers),
        inputs=lambda wildcards, input: cli_paths(input),
        outputs=lambda wildcards, output: cli_paths(output),
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("compare_layers", "{vision}", "{text}"),
    benchmark:
        layout.benchmark("compare_layers", "{vision}", "{text}")
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "python -m pipeline compare_layers --spec {params.spec:q} --in {params.inputs}"
        " --out {params.outputs} --threads {threads} > {log} 2>&1"


rule similarity:
    """Target: every encoder pair's similarity table, heatmaps and layer choice."""
    input:
        [layout.layers_json(vision, text) for vision, text in jobs.encoder_pairs(config)],
