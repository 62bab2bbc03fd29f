rule measure_well:
    input:
        "results/{plate}/segment/{well}.json",
    output:
        table="results/{plate}/measure/{well}.parquet",
        crops=directory("results/{plate}/crops/{well}.zarr"),
    log:
        "results/logs/{plate}/measure/{well}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=30,
    params:
        zarr=zarr_path,
        settings=settings_json("measure"),
        channel=config["segment"]["channel"],
    shell:
        "python -m metascreen measure --zarr {params.zarr} --plate {wildcards.plate} "
        "--well {wildcards.well} --settings {params.settings:q} --channel {params.channel} "
        "--table {output.table} --crops {output.crops} 2> {log}"
