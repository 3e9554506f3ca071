"""The pipeline's stages as plain functions, one module per stage (no Ray here).

Each module has one entry function that takes the config, reads and writes under the run root
(paths and identities from :mod:`ptmst_ray.layout`) and skips work that is already complete:

* :mod:`.data` ``prepare``: annotations + images -> Parquet shards
* :mod:`.pretrain` ``pretrain``: CLIP-style pretraining of the built-in towers
* :mod:`.embed` ``embed``: caption embeddings by the frozen text tower; ``load_real`` reads them back
* :mod:`.features` ``compute``: a frozen image tower's features of every real image, once; ``find`` for consumers
* :mod:`.experts` ``train_expert``: one expert trajectory; ``compress_expert``: its shortcuts
* :mod:`.phase` ``distill_phase``: one phase's synthetic subset
* :mod:`.aggregate` ``aggregate``: the phase subsets as one exported distilled set
* :mod:`.score` ``score_one_seed``: one method's recall for one seed; ``summarise``: results.json
* :mod:`.plots` ``plot_run``: the run's figure
* :mod:`.preflight` ``check``: everything a recipe needs, before any work

The Ray layer (:mod:`ptmst_ray.orchestration`) schedules these; a test can call any of them in-process.
"""
