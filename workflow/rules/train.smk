if config["train"]["model"]:

    rule import_model:
        input:
            config["train"]["model"],
        output:
            model="results/model/model.safetensors",
            metadata="results/model/model.json",
            evaluation="results/model/evaluation.json",
        log:
            "results/logs/model/import.log",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=mem_mb(1000),
            runtime=10,
        params:
            crop_settings=settings_json("measure"),
        shell:
            "python -m metascreen import-model --source {input:q} "
            "--crop-settings {params.crop_settings:q} --model {output.model} "
            "--evaluation {output.evaluation} 2> {log}"

else:

    rule train:
        input:
            tables=[f"results/{p}/measure/{w}.parquet" for p, w in training_wells()],
            crops=[f"results/{p}/crops/{w}.zarr" for p, w in training_wells()],
            segmentation_checks=ancient(training_segmentation_checks()),
        output:
            model="results/model/model.safetensors",
            metadata="results/model/model.json",
            evaluation="results/model/evaluation.json",
        log:
            "results/logs/model/train.log",
        conda:
            ENV
        threads: 2
        resources:
            mem_mb=mem_mb(4000),
            runtime=120,
        params:
            platemap=config["platemap"],
            training_wells=platemap_digest(columns=["plate", "well", "train_class"]),
            classes=json.dumps(config["classes"], sort_keys=True),
            settings=settings_json("train", drop=("model",)),
            crop_settings=settings_json("measure"),
        shell:
            "python -m metascreen train --tables {input.tables} --crops {input.crops} "
            "--platemap {params.platemap:q} --classes {params.classes:q} "
            "--settings {params.settings:q} --crop-settings {params.crop_settings:q} "
            "--model {output.model} --evaluation {output.evaluation} --threads {threads} 2> {log}"
