"""Training: token shards, data preparation, tokenizer training, pretraining, SFT, LoRA, FSDP."""
