"""pttd: a push-to-talk speech-to-text daemon for Raspberry Pi appliances."""

__version__ = "0.1.0"
