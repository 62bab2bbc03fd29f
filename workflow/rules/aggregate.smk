rule collect_plate:
    input:
        measurements=lambda wildcards: per_well(
            "results/{plate}/measure/{well}.parquet", wildcards.plate
        ),
        predictions=lambda wildcards: per_well(
            "results/{plate}/classify/{well}.parquet", wildcards.plate
        ),
        fields=lambda wildcards: per_well(
            "results/{plate}/fields/{well}.parquet", wildcards.plate
        ),
    output:
        cells="results/{plate}/{plate}_cells.parquet",
        fields="results/{plate}/{plate}_fields.parquet",
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
        qc=aggregation_qc_settings(),
    shell:
        "python -m metascreen collect --measurements {input.measurements} "
        "--predictions {input.predictions} --fields {input.fields} "
        "--platemap {params.platemap:q} --positive-class {params.positive:q} "
        "--qc {params.qc:q} --output {output.cells} --fields-output {output.fields} 2> {log}"


rule summarize:
    input:
        cells=expand("results/{plate}/{plate}_cells.parquet", plate=PLATES),
        fields=expand("results/{plate}/{plate}_fields.parquet", plate=PLATES),
    output:
        per_well=report(
            "results/summary/per_well.csv",
            caption="../../report/per_well.rst",
            category="Summary tables",
        ),
        per_sample=report(
            "results/summary/per_sample.csv",
            caption="../../report/per_sample.rst",
            category="Summary tables",
        ),
        per_plate=report(
            "results/summary/per_plate.csv",
            caption="../../report/per_plate.rst",
            category="Summary tables",
        ),
        parquet=expand(
            "results/summary/{table}.parquet",
            table=["per_well", "per_sample", "per_plate"],
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
        qc=aggregation_qc_settings(),
        settings=settings_json("aggregate"),
    shell:
        "python -m metascreen summarize --cells {input.cells} --fields {input.fields} "
        "--platemap {params.platemap:q} --qc {params.qc:q} --settings {params.settings:q} "
        "--outdir results/summary 2> {log}"
