"""The online service (`python -m recsys_mamba.serve`): events update each user's encoder state through
the encoder's own `step`, stored durably (`stores`), applied in batches by one writer (`ingest`), read
back as top-K lists and pair scores (`service`) over HTTP (`app`), measured (`metrics`)."""
