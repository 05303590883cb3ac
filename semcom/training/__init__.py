"""Training the JSC codec (and optional LoRA / QLoRA adapters) through the noisy channel.

One module per job, imported by path (this file imports nothing, so the server and
the exporter can take `adapters` without the trainer):

- `config`: TrainConfig and LoRASpec (plain data, no torch).
- `feature_cache`: encoder outputs over each utterance's content frames, cached on disk.
- `data`: training examples (built-in speech, the user's audiofolder, text) and batches.
- `adapters`: LoRA / QLoRA surgery on the model copy, merging, adapter weights in and out.
- `forward`: codec -> channel -> decoder logits, with Whisper's silence cross-attention spliced in.
- `schedule`: the learning-rate warm-up + cosine (also used by compress.distill).
- `trainer`: the Trainer (losses incl. the teacher KL, the loop); `run_state`: its checkpoints.
- `evaluate`: WER through codec + channel on cached features, long recordings, the rate table.
- `artifacts`: result JSON and plots.
"""
