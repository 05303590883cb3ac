"""Federated split fine-tuning: devices train their half (encoder LoRA + JSC encoder) on their own
speech, the server its JSC decoder, over Flower (docs/federated.md). Flower is imported only by
`flower_app`, and only when a federated run starts."""
