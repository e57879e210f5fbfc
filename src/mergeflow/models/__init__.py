"""Models: load base and experts (HF + peft), fine-tune, and score merged encoders."""
