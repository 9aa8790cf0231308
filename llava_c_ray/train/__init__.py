"""One continual stage on Ray Train: LoRA (or full) training with the UIR loss, checkpointed."""
