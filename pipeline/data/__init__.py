"""The data layer: the seven sources (:mod:`.sources`), Chinese-aware text hygiene (:mod:`.text`), per-row cleaning
(:mod:`.clean`), decontamination (:mod:`.decontam`), the Arrow data path of prepare (:mod:`.pool`), the manifest and
data card (:mod:`.card`), the mix and its sampler (:mod:`.mix`, :mod:`.sampler`), and the prepared pool as the
training stages read it (:mod:`.prepared`)."""
