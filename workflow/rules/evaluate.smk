rule evaluate_aligners:
    """Zero-shot classification, retrieval and segmentation of every run of one align job, a few
    predicted label maps of its example run, and the per-item hits of its runs."""
    input:
        unpack(inputs_of(jobs.evaluate_aligners)),
    output:
        metrics=layout.evaluation("{vision}", "{text}", "{method}", "{choice}"),
        examples=layout.segmentation_examples("{vision}", "{text}", "{method}", "{choice}"),
        outcomes=layout.outcomes("{vision}", "{text}", "{method}", "{choice}"),
    params:
        spec=spec_of(jobs.evaluate_aligners),
        inputs=lambda wildcards, input: cli_paths(input),
        outputs=lambda wildcards, output: cli_paths(output),
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("evaluate_aligners", "{vision}", "{text}", "{method}", "{choice}"),
    benchmark:
        layout.benchmark("evaluate_aligners", "{vision}", "{text}", "{method}", "{choice}")
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m pipeline evaluate_aligners --spec {params.spec:q} --in {params.inputs}"
        " --out {params.outputs} --threads {threads} > {log} 2>&1"


localrules:
    aggregate,
    publish,
    report,


rule aggregate:
    """One metrics table, its summary over seeds, the paired comparisons and the plots; with a
    layer sweep, its tables and similarity-against-accuracy plots too, all into results/staging
    (publish copies them out). Light (reads the evaluate jobs' small tables): on a cluster it
    runs where Snakemake runs, not as a SLURM job."""
    input:
        unpack(inputs_of(jobs.aggregate)),
    output:
        **{
            name: directory(path) if name == "plots" else path
            for name, path in jobs.aggregate(config).outputs.items()
        },
    params:
        spec=spec_of(jobs.aggregate),
        inputs=lambda wildcards, input: cli_paths(input),
        outputs=lambda wildcards, output: cli_paths(output),
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("aggregate", "tables"),
    benchmark:
        layout.benchmark("aggregate", "tables")
    threads: 2  # figure families drawn in parallel (matplotlib is single-threaded)
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m pipeline aggregate --spec {params.spec:q} --in {params.inputs}"
        " --out {params.outputs} --threads {threads} > {log} 2>&1"


# The published tables and plots, as the report shows them (the sweep's only with a `sweep`
# section: jobs.published lists them then).
PUBLISHED = {
    name: report(path, category="Tables", caption=f"../report/{name}.rst")
    for name, path in jobs.published(config).items()
    if name != "plots"
}


rule publish:
    """The aggregate's staged outputs copied to results/tables and results/plots, once it has
    succeeded: Snakemake deletes a job's outputs before it runs and when it fails, so a failing
    aggregate leaves what was published before."""
    input:
        unpack(inputs_of(jobs.publish)),
    output:
        **PUBLISHED,
        plots=report(
            directory(layout.PLOTS_DIR),
            patterns=["{name}.png"],
            category="Results",
            caption="../report/plots.rst",
        ),
    params:
        spec=spec_of(jobs.publish),
        inputs=lambda wildcards, input: cli_paths(input),
        outputs=lambda wildcards, output: cli_paths(output),
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("publish", "tables"),
    shell:
        "python -m pipeline publish --spec {params.spec:q} --in {params.inputs}"
        " --out {params.outputs} --threads {threads} > {log} 2>&1"


rule evaluate:
    """Target: every run evaluated on every task."""
    input:
        [layout.evaluation(*cell) for cell in jobs.grid_cells(config)],


rule report:
    """Target: everything the HTML report shows (render it with `snakemake --report`), and the
    aggregate's staged outputs: after a failed aggregate (which Snakemake records with the
    inputs it failed on) they are missing, so every run tries it again and names the fault;
    then its tables read in full (`python -m pipeline verify --tables`): a damaged one is named
    with its repair, which Snakemake alone would not notice when its date is right."""
    input:
        rules.publish.output,
        rules.aggregate.output,
        rules.similarity.input,
        rules.sweep.input,
    params:
        results=lambda wildcards, input: Path(input[0]).parent.parent,  # results/tables/<table>
        configfiles=CONFIGFILES,
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("report", "tables"),
    shell:
        "python -m pipeline verify --tables --results {params.results} {params.configfiles}"
        " 2>&1 | tee {log}"
