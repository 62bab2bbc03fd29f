if finetunes_segmenter():

    rule train_segmenter:
        input:
            annotation_tiffs(),
        output:
            model=SEGMENTER_MODEL,
            metadata="results/segmenter/model.json",
            evaluation="results/segmenter/evaluation.json",
        log:
            "results/logs/segmenter/train.log",
        conda:
            ENV
        threads: 2
        resources:
            mem_mb=mem_mb(4000),
            runtime=60,
        params:
            annotations=annotation_sources(),
            annotations_sha256=annotations.annotations_digest(annotation_sources()),
            settings=segmenter_training_settings(),
        shell:
            "python -m metascreen train-segmenter --annotations {params.annotations:q} "
            "--settings {params.settings:q} --model {output.model} "
            "--evaluation {output.evaluation} --threads {threads} 2> {log}"


rule estimate_cell_diameter:
    input:
        unpack(diameter_estimate_inputs),
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
        "python -m metascreen estimate-diameter --plan {input.plan} --settings {params.settings:q} "
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
        cell_diameter=input_flag("cell_diameter", "--cell-diameter"),
    shell:
        "python -m metascreen segment --zarr {params.zarr} --well {wildcards.well} "
        "--settings {params.settings:q} --manifest {output} --threads {threads} "
        "{params.cell_diameter} 2> {log}"


# Training and classification take the check as an ancient input: they wait for it, and a
# plate that fails it stops before them, but a check that reruns and passes (one well
# resegmented, a qc threshold changed) reruns nothing after it.
rule check_segmentation:
    input:
        lambda wildcards: per_well(
            "results/{plate}/segment/{well}.json", wildcards.plate
        ),
    output:
        "results/{plate}/segment/check.json",
    log:
        "results/logs/{plate}/segment/check.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=mem_mb(500),
        runtime=5,
    params:
        qc=segmentation_check_settings(),
    shell:
        "python -m metascreen check-segmentation --plate {wildcards.plate} --manifests {input} "
        "--qc {params.qc:q} --output {output} 2> {log}"
