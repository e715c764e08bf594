"""ran_peft: robust fine-tuning of vision-language models (RAN) as a PEFT adapter."""
