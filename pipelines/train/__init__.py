"""Training recipes: the shipped linear heads, voice and text recipe comparisons, fine-tuning, distillation,
fusion models. Each runner writes its table under `docs/models/` and ships files into `streamer/models/`."""
