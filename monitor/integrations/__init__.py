"""Trainer integrations: callbacks that run ``watch`` inside Lightning and Hugging Face trainers."""
