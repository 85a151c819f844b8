"""Turning data into models: pretraining with accelerate, alignment with TRL."""
