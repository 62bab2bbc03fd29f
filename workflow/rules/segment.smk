rule segment_well:
    input:
        "results/{plate}/ingest/{well}.json",
    output:
        "results/{plate}/segment/{well}.json",
    log:
        "results/logs/{plate}/segment/{well}.log",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=mem_mb(2000),
        runtime=30,
    params:
        zarr=zarr_path,
        settings=segment_settings(),
    shell:
        "python -m metascreen segment --zarr {params.zarr} --well {wildcards.well} "
        "--settings {params.settings:q} --manifest {output} --threads {threads} 2> {log}"
