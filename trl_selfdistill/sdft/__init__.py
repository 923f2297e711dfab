"""SDFT: Self-Distillation Fine-Tuning (Yang et al., ACL 2024, arXiv 2402.13669)."""
