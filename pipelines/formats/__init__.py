"""On-disk formats, each read and written in one place: WebDataset tars (`tar`), `.npy` members (`npy`),
feature sets (`features`: the shard writer of extract/convert and `FeatureSet`), task folders (`tasks`:
the task shard writer and the one TASKDIR reader) and the export layouts' writer table (`writers`).
The readers of released feature layouts are in `pipelines/feature_formats/`."""
