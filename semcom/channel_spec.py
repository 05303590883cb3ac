"""Moved to semedge.core.channel_spec."""
# shim: remove when semcom/training imports semedge.core
from semedge.core.channel_spec import (  # noqa: F401
    ACCEPTED, DEFAULT_K, KINDS, ChannelSpec, noise_std, parse_channel, parse_channels, parse_snr, snr_key,
)
