rule report_plate:
    input:
        unpack(cell_diameter_inputs),
        unpack(segmenter_evaluation_inputs),
        cells="results/{plate}/{plate}_cells.parquet",
        fields="results/{plate}/{plate}_fields.parquet",
        per_well="results/summary/per_well.parquet",
        per_sample="results/summary/per_sample.parquet",
        evaluation="results/model/evaluation.json",
        plan="results/{plate}/plan.json",
        model="results/model/model.safetensors",
        crops=lambda wildcards: per_well(
            "results/{plate}/crops/{well}.zarr", wildcards.plate
        ),
    output:
        report(
            "results/{plate}/report.html",
            caption="../../report/plate_report.rst",
            category="Reports",
            labels={"plate": "{plate}"},
        ),
    log:
        "results/logs/{plate}/report.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=20,
    params:
        crops_dir="results/{plate}/crops",
        zarr=zarr_path,
        config=json.dumps(config, sort_keys=True),
        cell_diameter=input_flag("cell_diameter", "--cell-diameter"),
        segmenter_evaluation=input_flag(
            "segmenter_evaluation", "--segmenter-evaluation"
        ),
    shell:
        "python -m metascreen report --plate {wildcards.plate} --cells {input.cells} "
        "--fields {input.fields} --per-well {input.per_well} --per-sample {input.per_sample} "
        "--evaluation {input.evaluation} --plan {input.plan} --model {input.model} "
        "--crops-dir {params.crops_dir} --zarr {params.zarr} --config {params.config:q} "
        "{params.cell_diameter} {params.segmenter_evaluation} --output {output} 2> {log}"


rule report_index:
    input:
        per_plate="results/summary/per_plate.parquet",
        per_sample="results/summary/per_sample.parquet",
    output:
        report(
            "results/summary/report.html",
            caption="../../report/index_report.rst",
            category="Reports",
            labels={"plate": "all plates"},
        ),
    log:
        "results/logs/summary/report.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=10,
    params:
        plates=PLATES,
    shell:
        "python -m metascreen report-index --plates {params.plates} "
        "--per-plate {input.per_plate} --per-sample {input.per_sample} --output {output} 2> {log}"
