localrules:
    verify,


rule verify:
    """Target: check every feature store and aligner run under results/ (chunks present and
    decodable, checksums, finite values, fingerprints, markers); print what is damaged and
    the command that repairs it. Exits non-zero when something is."""
    params:
        results=layout.RESULTS,
        configfiles=CONFIGFILES,
    conda:
        "../envs/postalign.yaml"
    log:
        layout.log("verify", "results"),
    shell:
        "python -m pipeline verify --results {params.results} {params.configfiles} 2>&1 | tee {log}"
