# postalign: post-hoc multimodal alignment with limited paired data.
# Thin on purpose: all logic is in the `pipeline` package; rules call `python -m pipeline`.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/extract.smk"


rule all:
    default_target: True
    input:
        rules.extract.input,
