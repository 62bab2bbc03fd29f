# metascreen: label-free screening of cancer cells for metastatic potential.
# Stages: ingest -> segment -> measure -> train -> classify -> aggregate -> report.
# Run: snakemake --profile profiles/local   (see README.md)
from snakemake.utils import min_version

min_version("9.0")


# The demo's config, unless a run names its own (--configfile): a user's config is not
# merged into the demo's.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/classify.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
