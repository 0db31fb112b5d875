"""The only package that imports MLflow: runs (:mod:`.runs`), the model registry (:mod:`.model_registry`, with the
pyfunc in :mod:`.adapter_model`), lookups of earlier stages' outputs and the pipeline's children (:mod:`.lineage`) and
the fingerprints ``make rerun`` compares (:mod:`.fingerprints`). MLflow itself is imported inside the functions, so
importing these modules stays light (the plans use :func:`.runs.tracking_uri`)."""
