"""Vision-language alignment: train a Hugging Face VLM on preference data, hand back artifacts peft/transformers load.

Modules (import them directly; this package imports nothing heavy):

- ``train``: the ``vlm train`` job (data -> adapter -> loss from the LOSSES registry -> trainer -> artifacts);
  ``generate_job``: ``vlm generate`` and ``vlm eval`` (POPE-style yes/no accuracy, F1, yes-ratio).
- ``loading``: a model folder or Hub id through ``AutoModelForImageTextToText``; ``prompts``: the model's chat
  template (plain fallback); ``pairs``: the user's rows (via :mod:`mmalign.data`) -> checked preference pairs;
  ``artifacts``: PEFT adapter folder, merged model, ``save_pretrained``.
- ``adapter``: :class:`~mmalign.vision_lm.adapter.VLMAdapter` — encode (prompt, response, images) examples with the
  model's processor, per-token / summed response log-probs, per-branch images in one concatenated forward, image
  tokens hidden from attention (BDHS), several frames, LoRA-disabled reference; ``generation``: KV-cached decoding.
- ``refcache``: reference log-probs precomputed once into safetensors, keyed by a data hash.
- ``objectives``: preference pairs -> batches -> core losses (any pairwise loss, realign, rrpo), online BDHS.
- ``methods``: Re-Align pair builder (image index + masked refilling), BDHS sampling, RRPO phrase alignment.
- testbed (not used on a user's model): ``tiny`` and ``families`` (tiny random-init LLaVA / LLaVA-NeXT / Idefics3 /
  SmolVLM with offline-built processors), ``scenes`` (procedural scenes with planted priors), ``testbed`` (SFT and
  scene pairs), ``benchmark`` (CHAIR/POPE benchmark), ``perf`` (tokens/s and MFU of DPO steps); the hallucination
  testbed: ``weak_scenes`` (weak evidence where the prior speaks, Bayes-optimal answers), ``halluc_base`` (the
  cached, gated base model), ``halluc_bench`` (one seed's method rows and diagnostics), ``stats`` (t-intervals,
  paired tests, Holm).
"""
