"""Training-only UDA machinery (EMA teacher, ClassMix/strong augmentation, MIC masking, losses)."""
