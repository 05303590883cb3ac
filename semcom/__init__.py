"""The semantic-communication system: models, split, JSC codec, channels, tasks, training."""
