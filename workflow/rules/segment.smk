rule estimate_cell_diameter:
    input:
        "results/{plate}/plan.json",
    output:
        "results/{plate}/segment/cell_diameter.json",
    log:
        "results/logs/{plate}/segment/cell_diameter.log",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=mem_mb(3000),
        runtime=30,
    params:
        settings=diameter_estimate_settings(),
    shell:
        "python -m metascreen estimate-diameter --plan {input} --settings {params.settings:q} "
        "--output {output} --threads {threads} 2> {log}"


rule segment_well:
    input:
        unpack(segment_inputs),
    output:
        "results/{plate}/segment/{well}.json",
    log:
        "results/logs/{plate}/segment/{well}.log",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=mem_mb(3000),
        runtime=30,
    params:
        zarr=zarr_path,
        settings=segment_settings(),
        cell_diameter=cell_diameter_flag,
    shell:
        "python -m metascreen segment --zarr {params.zarr} --well {wildcards.well} "
        "--settings {params.settings:q} --manifest {output} --threads {threads} "
        "{params.cell_diameter} 2> {log}"
