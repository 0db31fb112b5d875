"""The training layer both training stages (sft, align) share: their common config (:mod:`.config`), the TRL trainer
from the profile with our metrics, resume and registration (:mod:`.trainer`), the fixed probe prompts
(:mod:`.probes`) and the two preference losses (:mod:`.preference`)."""
