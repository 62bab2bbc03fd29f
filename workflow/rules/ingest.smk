rule plan_plate:
    input:
        images=lambda wildcards: config["plates"][wildcards.plate]["images"],
    output:
        plan="results/{plate}/plan.json",
        plate_metadata="results/{plate}/{plate}.ome.zarr/zarr.json",
    log:
        "results/logs/{plate}/plan.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=10,
    params:
        zarr=zarr_path,
        platemap=config["platemap"],
        platemap_wells=lambda wildcards: platemap_digest(
            wildcards.plate, columns=["plate", "well"]
        ),
        settings=settings_json("ingest"),
    shell:
        "python -m metascreen plan --plate {wildcards.plate} --images {input.images:q} "
        "--platemap {params.platemap:q} --settings {params.settings:q} "
        "--plan {output.plan} --zarr {params.zarr} 2> {log}"


rule ingest_well:
    input:
        plan="results/{plate}/plan.json",
        plate_metadata="results/{plate}/{plate}.ome.zarr/zarr.json",
    output:
        "results/{plate}/ingest/{well}.json",
    log:
        "results/logs/{plate}/ingest/{well}.log",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=mem_mb(2000),
        runtime=30,
    params:
        zarr=zarr_path,
        settings=settings_json("ingest"),
    shell:
        "python -m metascreen ingest --plan {input.plan} --zarr {params.zarr} --well {wildcards.well} "
        "--settings {params.settings:q} --manifest {output} --threads {threads} 2> {log}"
