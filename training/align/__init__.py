"""The alignment stage: SFT and DPO with TRL on our model folders (sft.py, dpo.py, and what they share:
common.py, data.py, model_folder.py, model_card.py), and talking to the result (chat.py)."""
