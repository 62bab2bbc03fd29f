rule measure_well:
    input:
        "results/{plate}/segment/{well}.json",
    output:
        table="results/{plate}/measure/{well}.parquet",
        crops=directory("results/{plate}/crops/{well}.zarr"),
        fields="results/{plate}/fields/{well}.parquet",
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
        saturation_level=json.dumps(config["qc"]["saturation_level"]),
    shell:
        "python -m metascreen measure --zarr {params.zarr} --plate {wildcards.plate} "
        "--well {wildcards.well} --settings {params.settings:q} --channel {params.channel} "
        "--saturation-level {params.saturation_level:q} --table {output.table} "
        "--crops {output.crops} --fields {output.fields} 2> {log}"
