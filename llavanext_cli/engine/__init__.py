"""How the model runs: the execution plan, generation (batched, halved out of memory), shared prefixes and a chat's
cache, classify's scoring, --schema's constraint, the pipeline that keeps the model busy, and a run's figures.
Imports from model and io only."""
