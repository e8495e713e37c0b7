# postalign: post-hoc multimodal alignment with limited paired data.
# Thin on purpose: all logic is in the `pipeline` package; rules call `python -m pipeline`.
# Targets: extract, similarity, sweep, tokens, align, evaluate, report, verify; `all` (the
# default) is everything but verify.
from snakemake.utils import min_version

min_version("9.0")


# The default config, unless one is given with --configfile: that one replaces it (no
# merging); single keys can still be overridden on top with --config KEY=VALUE.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/similarity.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/tokens.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/verify.smk"


onstart:
    # Checks that import the model libraries (not needed to read the workflow), before any job.
    preflight(config, local=workflow.local_exec)


rule all:
    default_target: True
    input:
        rules.report.input,
