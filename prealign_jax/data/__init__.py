"""The tagged corpus: synthetic generator, raw-text ingest, shards, scorer and the
seqio pipeline that turns shards into packed, loss-weighted decoder batches.

Entry points: `prepare.prepare` (the `prealign prepare` command), `tasks.register` (seqio
Tasks/Mixture over a data dir) and `pipeline.get_dataset` (what the trainer calls).
"""
