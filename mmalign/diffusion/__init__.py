"""Diffusion-model preference alignment (MaPO, Diffusion-DPO, SFT baseline) on diffusers UNets.

Modules (imported explicitly; this package imports nothing heavy):
``adapter`` (paired denoising errors, references, LoRA, loss functions from the LOSSES registry), ``models`` (the
tiny shapes UNet or any diffusers pipeline to train), ``encoding`` (image pairs to VAE latents and prompt
embeddings), ``text_training`` (text encoders trained with the UNet), ``latent_cache`` (encoded once, keyed by data
and encoder), ``data`` (pair caches), ``artifacts`` (LoRA / UNet / pipeline folders diffusers loads, and loading
them back), ``sampling`` (scheduler-loop sampling), ``pipeline`` (pipelines with a trained UNet: tiny offline
SD/SDXL, generation, evaluation, image files), ``scorers`` (pixel statistics, CLIP score), ``shapes`` /
``shapes_eval`` (the procedural shapes task), ``train`` (job ``diffusion.train``), ``sample`` (job
``diffusion.sample``), ``benchmark`` (job ``diffusion.benchmark``, built on train's modules), ``perf`` (MaPO vs
Diffusion-DPO cost).
"""
