"""PromptKD training: class vectors from a CLIP teacher and unsupervised distillation of a prompted student."""
