rule classify_well:
    input:
        table="results/{plate}/measure/{well}.parquet",
        crops="results/{plate}/crops/{well}.zarr",
        model="results/model/model.safetensors",
        segmentation_check=ancient("results/{plate}/segment/check.json"),
    output:
        "results/{plate}/classify/{well}.parquet",
    log:
        "results/logs/{plate}/classify/{well}.log",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=mem_mb(2000),
        runtime=30,
        gpu=1 if config["classify"]["gpu"] else 0,
    params:
        settings=settings_json("classify", drop=("gpu",)),
    shell:
        "python -m metascreen classify --table {input.table} --crops {input.crops} "
        "--model {input.model} --settings {params.settings:q} --output {output} "
        "--threads {threads} 2> {log}"
