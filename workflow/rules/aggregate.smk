rule collect_plate:
    input:
        measurements=lambda wildcards: per_well(
            "results/{plate}/measure/{well}.parquet", wildcards.plate
        ),
        predictions=lambda wildcards: per_well(
            "results/{plate}/classify/{well}.parquet", wildcards.plate
        ),
    output:
        "results/{plate}/{plate}_cells.parquet",
    log:
        "results/logs/{plate}/collect.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=20,
    params:
        platemap=config["platemap"],
        platemap_rows=lambda wildcards: platemap_digest(wildcards.plate),
        positive=config["classes"]["positive"],
    shell:
        "python -m metascreen collect --measurements {input.measurements} "
        "--predictions {input.predictions} --platemap {params.platemap:q} "
        "--positive-class {params.positive:q} --output {output} 2> {log}"


rule summarize:
    input:
        expand("results/{plate}/{plate}_cells.parquet", plate=PLATES),
    output:
        expand(
            "results/summary/{table}.{kind}",
            table=["per_well", "per_sample", "per_plate"],
            kind=["csv", "parquet"],
        ),
    log:
        "results/logs/summary/summarize.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=20,
    params:
        platemap=config["platemap"],
        platemap_rows=platemap_digest(),
        settings=settings_json("aggregate"),
    shell:
        "python -m metascreen summarize --cells {input} --platemap {params.platemap:q} "
        "--settings {params.settings:q} --outdir results/summary 2> {log}"
