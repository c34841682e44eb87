"""pipelines: the data stages between the detector and the model.

Images -> feature shards (`vilbert-data extract`, a Ray job), feature shards + annotations -> task
shards (`vilbert-data shard`), task shards -> padded batches (`pipelines.datasets`).
Submodules are imported explicitly (`from pipelines.datasets import ...`) so that importing the
package stays cheap.
"""
