"""The tagged corpus: synthetic generator, raw-text ingest, shards, scorer and the
seqio pipeline that turns shards into packed, loss-weighted decoder batches.

Entry points: `prepare.prepare` (the `prealign prepare` command), `pipeline.get_dataset`
(packed batches of a registered seqio Mixture; `prealign_jax.tasks.register` registers one
over a data dir, at the edge) and `feed.SeqioData` (what the trainer reads).
"""
