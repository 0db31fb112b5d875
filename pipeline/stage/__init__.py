"""The stage contract: what a stage declares about itself (:mod:`.spec`), how its config is resolved with a profile
and a model (:mod:`.resolve`), what its dry run prints (:mod:`.dryrun`), and the command line every stage shares
(:mod:`.cli`). The stages are the modules ``pipeline/<name>.py`` that declare a ``STAGE``; nothing here lists them."""
