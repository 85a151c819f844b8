"""The data stage: text sources -> a tokenizer and token shards (prepare) -> batches of windows;
and the shards' growth while training runs (tokenise_beside). Imports nothing of the stages after it."""
